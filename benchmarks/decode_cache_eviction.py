"""What the decode cache's size cap costs (``data.decode_cache_max_gb``).

A scan lists and stats the whole cache directory (there is no index: the file system is
the index) and deletes the least recently used entries until it fits, so its cost grows
with the number of entries; a writer scans once per 1% of the cap it writes, or when its
own count says the cache may be over the cap (``SizeCap``). Side by side in one run:

- real data, filling an empty cache in /dev/shm with every class of a training split
  through ``ClassStore`` (decode + write): uncapped, capped above the split's size
  (nothing evicted) and capped at half of it (evicting once full); the scans each made,
  per-class time over the first and the last tenth of the classes;
- one scan of a cache already holding N entries (N up to 100,000, 1 KB each: the scan
  costs per entry, not per byte) with nothing to evict, against the time to decode one
  class of each dataset, which every write follows.

    python benchmarks/decode_cache_eviction.py [--scan-sizes 1000,10000,100000]

Datasets are converted into data/ first if missing. Results: benchmarks/results/
decode_cache_eviction.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from episode_pipeline import dataset  # converts into data/ if missing

from metadist.data.decode_cache import evict_least_recent, key_name
from metadist.data.store import ClassStore
from metadist.launch.reproduce import machine

ROOT = Path(__file__).resolve().parents[1]


def fill(split: Path, cache: Path, max_gb: float | None,
         classes: int) -> tuple[list[float], int]:
    """Seconds per class to decode and write base classes 1 to ``classes`` - 1, and the
    scans of the cache that made."""
    store = ClassStore(split, decode_cache=cache, decode_cache_max_gb=max_gb,
                       max_cached_classes=0)
    store.load_class(0)  # untimed: the first read opens the shards
    times = []
    for base in range(1, classes):
        t0 = time.perf_counter()
        store.load_class(base)
        times.append(time.perf_counter() - t0)
    return times, 0 if store._size_cap is None else store._size_cap.scans


def cache_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in cache.rglob("*.npy"))


def real_rows(name: str, classes: int | None) -> tuple[list[str], float]:
    split = dataset(name, ROOT / "data" / name) / "train"
    every = ClassStore(split, verify=False).num_base_classes
    classes = every if classes is None else min(classes, every)
    rows = []
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="md-evict-") as d:
        uncapped, _ = fill(split, Path(d) / "uncapped", None, classes)
        total = cache_bytes(Path(d) / "uncapped")
        shutil.rmtree(Path(d) / "uncapped")
        runs = {"uncapped": (uncapped, 0)}
        for label, max_gb in (("cap above the split", 2 * total / 1e9),
                              ("cap at half (evicts)", total / 2 / 1e9)):
            runs[label] = fill(split, Path(d) / "capped", max_gb, classes)
            held = cache_bytes(Path(d) / "capped")
            shutil.rmtree(Path(d) / "capped")
            assert held <= max_gb * 1e9, (label, held)  # the cap held
        tenth = max(1, classes // 10)
        base = sum(uncapped)
        for label, (t, scans) in runs.items():
            rows.append(
                f"| {name} | {label} | {classes} | {scans} | {sum(t):.2f} | "
                f"{sum(t) / base:.2f}x | {1e3 * np.mean(t[:tenth]):.2f} | "
                f"{1e3 * np.mean(t[-tenth:]):.2f} |")
    return rows, float(np.median(uncapped))


def scan_rows(sizes: list[int]) -> list[str]:
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="md-scan-") as d:
            key = Path(d) / key_name("train", 28, 1, "0" * 16)
            key.mkdir()
            payload = bytes(1024)
            for i in range(n):
                (key / f"{i}.npy").write_bytes(payload)
            keep = key / "0.npy"
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                evicted, _ = evict_least_recent(Path(d), max_bytes=10 * n * 1024, keep=keep)
                times.append(time.perf_counter() - t0)
            assert evicted == 0 and len(os.listdir(key)) == n
            rows.append(f"| {n:,} | {1e3 * min(times):.1f} | {1e3 * np.median(times):.1f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scan-sizes", default="1000,10000,100000")
    ap.add_argument("--omniglot-classes", type=int,
                    help="base classes of Omniglot's training split to write (default: all)")
    ap.add_argument("--mini-classes", type=int,
                    help="classes of miniImageNet's training split to write (default: all)")
    args = ap.parse_args()
    m = machine()
    lines = [
        "# Decode-cache size cap: what it costs", "",
        f"Machine: {m['cpu_model']}, {m['cpus']} CPUs, {m['platform']}; cache in /dev/shm.",
        "",
        "Filling an empty cache with a training split's classes (decode + write, one "
        "process, no in-memory cache):", "",
        "| dataset | cap | classes | scans | total (s) | vs uncapped | "
        "ms/class, first tenth | ms/class, last tenth |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    decode_ms = {}
    for name, classes in (("omniglot", args.omniglot_classes),
                          ("miniimagenet", args.mini_classes)):
        rows, median = real_rows(name, classes)
        lines += rows
        decode_ms[name] = 1e3 * median
    lines += ["", "One scan of a cache holding N entries, nothing to evict (what a writer "
              "adds once per 1% of the cap it writes), against one class's uncapped "
              "decode + write "
              "(median above): " + ", ".join(f"{k} {v:.1f} ms" for k, v in decode_ms.items())
              + ":", "", "| entries | scan, best of 5 (ms) | median (ms) |", "|---:|---:|---:|"]
    lines += scan_rows([int(s) for s in args.scan_sizes.split(",")])
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "benchmarks" / "results" / "decode_cache_eviction.md"
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
