"""Episodes per second of the Ray episode pipeline against the rate meta-training consumes.

Real Omniglot (5-way 1-shot, 15 queries, 28x28 grey, PNG) and real miniImageNet (5-way
1-shot, 15 queries, 84x84 RGB, JPEG: decoding is the expensive part), training splits,
with 1 and 2 actors (0.25 logical CPU each), side by side in one run:

- cold: the first pass over ``--steps`` meta-batches with fresh actors, timed from the
  moment the first actor was ready (its process start is the "first batch" column);
  every class an episode needs is decoded on first use, per actor;
- warm: a second pass over the same meta-batches (every class cached);
- with a decode cache (``data.decode_cache``, a directory in /dev/shm here): fresh actors
  on an empty cache (they fill it), then fresh actors again on the filled cache (a new
  run or a sweep's next trial), each row's actors' private (anonymous) and shared
  (file- or tmpfs-backed: the mapped cache, the interpreter's libraries) resident memory
  read from /proc after its warm pass.

The driver only calls ``get`` (no training), so the rates are what the pipeline can
deliver, to be compared with what a trainer consumes: second-order MAML's meta-gradients
on the shipped configs (``TRAINERS``), measured in the same run with no pipeline running.
On a 2-core machine actors and trainer share the cores.

    nice -n 10 python benchmarks/episode_pipeline.py [--steps 10] [--mini-steps 40]

Datasets are converted into data/ first if missing.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
import torch  # noqa: E402

from metadist.launch.reproduce import machine as reproduce_machine  # noqa: E402
from metadist.runners.pipeline import EpisodePipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
# What meta-training consumes, per dataset: (name, config, overrides).
TRAINERS = {
    "Omniglot": [
        ("maml stride-2 Conv4-64 (config)", "configs/omniglot_5w1s_maml.yaml", []),
        ("maml max-pool Conv4-64", "configs/omniglot_5w1s_maml.yaml", ["model.pool=max"]),
    ],
    "miniImageNet": [("maml Conv4-32 (config)", "configs/miniimagenet_5w1s_maml.yaml", [])],
}


def dataset(name: str, path: Path) -> Path:
    if (path / "dataset.json").is_file():
        return path
    from metadist.data.ingest import convert_miniimagenet, convert_omniglot

    print(f"converting {name} into {path} ...", flush=True)
    t0 = time.perf_counter()
    if name == "omniglot":
        convert_omniglot(SHARED / "omniglot", path)
    else:
        convert_miniimagenet(SHARED / "miniimagenet", path)
    print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def measure(split: Path, *, actors: int, meta_batch: int, steps: int, prefetch: int,
            decode_cache: str | None = None) -> dict:
    """One pipeline: cold pass, then warm pass over the same ``steps`` meta-batches."""
    t0 = time.time()
    with EpisodePipeline(
        split, ways=5, shots=1, queries=15, seed=0, preprocessing=None,
        meta_batch_size=meta_batch, num_actors=actors, prefetch=prefetch, verify=False,
        decode_cache=decode_cache,
    ) as pipe:
        first = None
        for step in range(steps):
            batch = pipe.get(step)
            first = first or time.time()
        cold_end = time.time()
        bytes_per_batch = sum(t.numel() * t.element_size() for t in batch)
        stats = pipe.actor_stats()  # also waits for the prefetched requests to finish
        ready = min(s["started_at"] for s in stats)
        cached = [s["cached_classes"] for s in stats]
        w0 = time.time()
        for step in range(steps):
            pipe.get(step)  # back to step 0: the same episodes, now from the cache
        warm = time.time() - w0
        memory = [resident_mb(ray.get(a.pid.remote())) for a in pipe.actors]
    episodes = steps * meta_batch
    return {
        "actors": actors,
        "meta_batch": meta_batch,
        "episodes": episodes,
        "first_batch_s": first - t0,
        "start_s": ready - t0,
        "cold": episodes / (cold_end - ready),
        "warm": episodes / warm,
        "cached": cached,
        "mb_per_batch": bytes_per_batch / 2**20,
        "memory": memory,
    }


def resident_mb(pid: int) -> tuple[float, float]:
    """(private, shared) resident memory of a process, MB: decoded classes a process holds
    itself are private (RssAnon); memory-mapped cache files are shared with every process
    that maps them, counted as RssShmem when the cache lies on tmpfs (/dev/shm) and as
    RssFile on disk."""
    fields = {k: int(v.split()[0]) / 1024 for k, v in
              (line.split(":", 1) for line in
               Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
              if k.startswith("Rss")}
    return fields["RssAnon"], fields["RssFile"] + fields["RssShmem"]


def consumption(config: Path, overrides: list[str], steps: int, threads: int) -> float:
    """Tasks/s the config's meta-training consumes: ``steps`` meta-gradients of one full
    meta-batch (loop path, the optimiser step left out), episodes built in-process
    beforehand so that no data work is timed."""
    from metadist.algorithms import MetaStep, meta_gradient
    from metadist.config import load_config
    from metadist.models import build_model
    from metadist.training.streams import episode_batch, open_streams

    torch.set_num_threads(threads)
    cfg = load_config(config, overrides)
    streams = open_streams(cfg.data, train_seed=0, eval_seed=0)
    model = build_model(cfg.model, ways=cfg.data.ways, in_channels=streams.in_channels,
                        image_size=streams.image_size)
    params = {k: v.requires_grad_() for k, v in model.init_params().items()}
    step = MetaStep.from_config(cfg.algorithm)
    tasks = cfg.algorithm.meta_batch_size
    meta_gradient(model, params, episode_batch(streams.train, 0, 1), step)  # warm-up
    batch = episode_batch(streams.train, 1, 1 + tasks)
    t0 = time.perf_counter()
    for _ in range(steps):
        meta_gradient(model, params, batch, step)
    return tasks * steps / (time.perf_counter() - t0)


def machine() -> dict:
    """metadist.launch.reproduce.machine() (the CPU and its instruction sets, as records name
    them) and what bears on the pipeline's rates."""
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return {**reproduce_machine(), "mem_gb": int(mem) / 2**20,
            "python": platform.python_version(), "ray": ray.__version__, "nice": os.nice(0)}


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--omniglot", type=Path, default=ROOT / "data" / "omniglot")
    parser.add_argument("--miniimagenet", type=Path, default=ROOT / "data" / "miniimagenet")
    parser.add_argument("--steps", type=int, default=10, help="Omniglot meta-batches per pass")
    parser.add_argument("--meta-batch", type=int, default=32, help="Omniglot")
    parser.add_argument("--mini-steps", type=int, default=40)
    parser.add_argument("--mini-meta-batch", type=int, default=4)
    parser.add_argument("--prefetch", type=int, default=4)
    parser.add_argument("--actors", default="1,2")
    parser.add_argument("--cache-actors", type=int, default=2,
                        help="actors of the decode-cache rows")
    parser.add_argument("--rate-steps", type=int, default=2,
                        help="meta-steps timed per consumption rate")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads for the consumption rates")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "episode_pipeline.md")
    args = parser.parse_args()

    load_before = load()
    t_start = time.perf_counter()
    omniglot = dataset("omniglot", args.omniglot)
    mini = dataset("miniimagenet", args.miniimagenet)
    rows = []
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for name, data, mb, steps in (("Omniglot", omniglot, args.meta_batch, args.steps),
                                      ("miniImageNet", mini, args.mini_meta_batch,
                                       args.mini_steps)):
            cache = tempfile.mkdtemp(prefix="metadist-decoded-",
                                     dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
            runs = [(int(a), None, "none") for a in args.actors.split(",")]
            runs += [(args.cache_actors, cache, "empty"), (args.cache_actors, cache, "filled")]
            try:
                for actors, decode_cache, state in runs:
                    row = measure(data / "train", actors=actors, meta_batch=mb, steps=steps,
                                  prefetch=args.prefetch, decode_cache=decode_cache)
                    row["dataset"], row["decode_cache"] = name, state
                    rows.append(row)
                    print(f"{name:12s} {actors} actor(s), decode cache {state}: first batch "
                          f"{row['first_batch_s']:.1f} s, cold {row['cold']:.0f} ep/s, warm "
                          f"{row['warm']:.0f} ep/s", flush=True)
            finally:
                shutil.rmtree(cache, ignore_errors=True)
    finally:
        ray.shutdown()
    paths = {"Omniglot": omniglot, "miniImageNet": mini}
    rates = {
        name: [(trainer, consumption(ROOT / config, [*overrides, f"data.dataset={paths[name]}"],
                                     args.rate_steps, args.threads))
               for trainer, config, overrides in trainers]
        for name, trainers in TRAINERS.items()
    }
    how = (f"{args.rate_steps} meta-gradient(s) of one full meta-batch each, loop path, "
           f"{args.threads} torch threads, nice {os.nice(0)}, no pipeline running")
    total = time.perf_counter() - t_start
    table = render(rows, rates, how, machine(), load_before, load(), total, args)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)


def render(rows, rates, how, info, load_before, load_after, total, args) -> str:
    busy = float(load_before.rsplit(":", 1)[1].split(",")[0]) > 1.0
    lines = [
        "# Episode pipeline throughput (Ray actors)",
        "",
        f"Machine: {info['cpu_model']}, {info['cpus']} cores, {info['mem_gb']:.0f} GB "
        f"({info['cpu_isa']}); Python "
        f"{info['python']}, torch {info['torch']}, ray {info['ray']}; benchmark at nice "
        f"{info['nice']}; `ray.init(num_cpus=2)`, actors of 0.25 logical CPU, "
        f"1 torch thread each, prefetch {args.prefetch}. Run took {total:.0f} s.",
        "",
        f"Load before: `{load_before}`  ",
        f"Load after: `{load_after}`",
        "",
    ]
    if busy:
        lines += [
            "**Measured while another training job was running on this machine** (load "
            "average above 1 before the run): the actors got what that job left of the 2 "
            "cores. The rates below are lower bounds for an idle machine.",
            "",
        ]
    lines += [
        "5-way 1-shot, 15 queries per class, training split, seed 0. *cold*: first pass "
        "with fresh actors (each decodes every class it meets, once), timed from the first "
        "actor being ready; *first batch*: pipeline construction to the first meta-batch "
        "(actor process start, store open, first decodes); *warm*: the same meta-batches "
        "again, all classes cached. ep/s = episodes (tasks) per second delivered to a driver "
        "that does nothing else. *decode cache*: none (each actor decodes and keeps its "
        "classes), empty (fresh actors fill a shared `data.decode_cache` directory in "
        "/dev/shm), filled (fresh actors on the directory the row above filled). *actor "
        "memory*: each actor's private / shared resident MB after the warm pass (shared: "
        "file- and tmpfs-backed pages, i.e. the libraries every process maps and the mapped "
        "cache files, held once per node however many actors map them).",
        "",
        "| dataset | actors | decode cache | meta-batch | episodes/pass | MB/meta-batch "
        "| first batch (s) | cold ep/s | warm ep/s | classes cached per actor "
        "| actor memory, private / shared (MB) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        memory = ", ".join(f"{a:.0f} / {f:.0f}" for a, f in r["memory"])
        lines.append(
            f"| {r['dataset']} | {r['actors']} | {r['decode_cache']} | {r['meta_batch']} "
            f"| {r['episodes']} | {r['mb_per_batch']:.1f} | {r['first_batch_s']:.1f} "
            f"| {r['cold']:.0f} | {r['warm']:.0f} | {', '.join(map(str, r['cached']))} "
            f"| {memory} |"
        )
    lines += [
        "",
        "Against what meta-training consumes (tasks/s); ratio = pipeline rate / consumption "
        "(above 1: the pipeline keeps ahead, if it gets the CPU):",
        "",
        "| dataset | trainer | consumes (tasks/s) | actors | decode cache | cold ratio "
        "| warm ratio |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        for trainer, rate in rates[r["dataset"]]:
            lines.append(
                f"| {r['dataset']} | {trainer} | {rate:.3g} | {r['actors']} "
                f"| {r['decode_cache']} "
                f"| {r['cold'] / rate:.1f} | {r['warm'] / rate:.1f} |"
            )
    lines += [
        "",
        f"Consumption rates, measured in this run: {how}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
