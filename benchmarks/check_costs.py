"""What two of metadist's checks cost, side by side in one run, and the main job's time.

- The decode cache's checksum (``metadist.data.store``): each cached class ends with the
  sha256 of its pixels, verified once per class and process. Measured on real
  miniImageNet training classes (600 images of 84x84x3): the sha256 of one class, the
  cached read it is added to (memory-mapping the entry), and decoding the class from its
  Parquet shard (what the cache saves).
- The README's main job, ``metadist train configs/sinusoid_maml.yaml`` (tracking off),
  end to end, with the training time it reports.

    python benchmarks/check_costs.py [--classes 16]

miniImageNet is converted into data/ first if missing. Results:
benchmarks/results/check_costs.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from episode_pipeline import dataset  # converts into data/ if missing

from metadist.data.store import ClassStore
from metadist.launch.reproduce import machine

ROOT = Path(__file__).resolve().parents[1]


def per_class(fn, classes: int) -> float:
    times = []
    for c in range(classes):
        t0 = time.perf_counter()
        fn(c)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--classes", type=int, default=16)
    args = parser.parse_args()
    split = dataset("miniimagenet", ROOT / "data" / "miniimagenet") / "train"
    with tempfile.TemporaryDirectory(dir="/dev/shm") as cache:
        plain = ClassStore(split, image_size=84, channels=3, max_cached_classes=0)
        decode_s = per_class(plain.load_class, args.classes)
        writer = ClassStore(split, image_size=84, channels=3, decode_cache=cache,
                            max_cached_classes=0)
        for c in range(args.classes):
            writer.load_class(c)
        entries = [writer.decode_cache / f"{writer.base_class(c)[0]}.npy"
                   for c in range(args.classes)]
        mmap_s = per_class(lambda c: np.load(entries[c], mmap_mode="c"), args.classes)
        arrays = [np.load(e, mmap_mode="c") for e in entries]
        sha_s = per_class(lambda c: hashlib.sha256(memoryview(arrays[c]).cast("B")).digest(),
                          args.classes)
        reader = ClassStore(split, image_size=84, channels=3, decode_cache=cache,
                            max_cached_classes=0)
        read_s = per_class(reader.load_class, args.classes)  # map + verify, as training does
        mb = arrays[0].nbytes / 1e6

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        run = subprocess.run(
            [sys.executable, "-m", "metadist.cli", "train", "configs/sinusoid_maml.yaml",
             "tracking.enabled=false", f"train.output_dir={out}"],
            cwd=ROOT, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    result = json.loads(run.stdout[run.stdout.index("{"):])

    m = machine()
    lines = [
        "# What the checks cost, and the main job's time",
        "",
        f"Machine: {m['cpus']}-core CPU, {m.get('cpu_model', '?')}, torch {m['torch']}. "
        f"Median over {args.classes} miniImageNet training classes ({mb:.1f} MB each "
        "decoded), cache in /dev/shm, one run of `python benchmarks/check_costs.py`.",
        "",
        "| per class | ms |",
        "|---|---:|",
        f"| decode from the Parquet shard (no cache) | {decode_s * 1e3:.0f} |",
        f"| memory-map the cached entry | {mmap_s * 1e3:.2f} |",
        f"| sha256 of its pixels (the checksum) | {sha_s * 1e3:.1f} |",
        f"| cached read as training does it (map + verify) | {read_s * 1e3:.1f} |",
        "",
        "The checksum is paid once per class and process; the decode it sits beside is what",
        "the cache saves.",
        "",
        "| main job: `metadist train configs/sinusoid_maml.yaml tracking.enabled=false` | s |",
        "|---|---:|",
        f"| training ({result['steps']:,} meta-steps, its own `train_seconds`) | "
        f"{result['train_seconds']:.0f} |",
        f"| end to end (process start to meta-test printed) | {wall:.0f} |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    (ROOT / "benchmarks" / "results" / "check_costs.md").write_text(text)


if __name__ == "__main__":
    main()
