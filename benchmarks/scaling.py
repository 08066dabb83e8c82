"""Scaling of meta-training with workers, at equal total CPU, and what data loading costs.

Runs, one after another in this one invocation (this machine is noisy; compare rows of
the same run only), each a real `metadist` run of Omniglot 5-way 1-shot MAML
(configs/omniglot_5w1s_maml.yaml, Conv4-64 stride-2, meta-batch 32):

  1 process, 2 torch threads, episodes sampled in-process
  Ray Train, 1 worker x 2 threads, fed by the episode actor pipeline
  Ray Train, 2 workers x 1 thread, each fed by its own actors
  torchrun, 2 workers x 1 thread, episodes sampled in-process

and measures the gloo all-reduce of the model's meta-gradient (one flat bucket) between
2 processes on loopback, for the cost model printed at the end.

    python benchmarks/scaling.py [--steps 30] [--data data/omniglot]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
       "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def run(cmd: list[str], env: dict) -> dict:
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    text = out.stdout
    return json.loads(text[text.index("{"):])


def allreduce_child(rank: int, world: int, numel: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    buf = torch.randn(numel)
    for _ in range(5):
        dist.all_reduce(buf)
    t0 = time.perf_counter()
    n = 50
    for _ in range(n):
        dist.all_reduce(buf)
    dt = (time.perf_counter() - t0) / n
    if rank == 0:
        Path(out).write_text(str(dt))
    dist.destroy_process_group()


def measure_allreduce(numel: int) -> float:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.NamedTemporaryFile() as f:
        mp.spawn(allreduce_child, args=(2, numel, port, f.name), nprocs=2)
        return float(Path(f.name).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--data", default=str(ROOT / "data" / "omniglot"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling.md"))
    args = parser.parse_args()
    config = "configs/omniglot_5w1s_maml.yaml"
    common = [f"data.dataset={args.data}", f"train.steps={args.steps}", "train.val_every=0",
              "train.checkpoint_every=0", "eval.episodes=10", "train.progress=false",
              "tracking.enabled=false", "train.inner_loop=loop"]
    with tempfile.TemporaryDirectory() as tmp:
        out = [f"train.output_dir={tmp}"]
        cli = [sys.executable, "-m", "metadist.cli", "train", config, *common, *out]
        rows = [
            ("1 process, 2 threads, in-process sampling", cli + ["train.threads=2"], 2),
            ("Ray Train 1 worker x 2 threads, actor pipeline",
             cli + ["ray.enabled=true", "workers=1", "ray.cpus_per_worker=2",
                    "train.threads=2", "ray.actors=1"], 2),
            ("Ray Train 2 workers x 1 thread, actor pipeline",
             cli + ["workers=2", "ray.cpus_per_worker=1", "train.threads=1", "ray.actors=1"], 1),
            ("torchrun 2 workers x 1 thread, in-process sampling",
             [sys.executable, "-m", "torch.distributed.run", "--standalone",
              "--nproc-per-node=2", "-m", "metadist.worker", config, *common, *out,
              "train.threads=1"], 1),
        ]
        results = []
        for name, cmd, threads in rows:
            env = {**ENV, "OMP_NUM_THREADS": str(threads)}
            r = run(cmd, env)
            tasks_per_s = args.steps * 32 / r["train_seconds"]
            results.append((name, r, tasks_per_s))
            print(f"{name}: {tasks_per_s:.1f} tasks/s, data wait "
                  f"{100 * r['data_wait_fraction']:.1f}%", flush=True)

    from metadist.config import ModelConfig
    from metadist.models import build_model

    model = build_model(ModelConfig(hidden=64, pool="stride"), ways=5, in_channels=1,
                        image_size=28)
    numel = sum(p.numel() for p in model.init_params().values()) + 3  # + loss/acc/count
    allreduce_s = measure_allreduce(numel)
    base = results[0][2]
    lines = [
        "# Scaling: tasks/s with 1 and 2 workers at equal total CPU",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}. Omniglot 5-way 1-shot MAML, Conv4-64 stride-2, "
        f"meta-batch 32, {args.steps} steps per row (first step included), rows run one after "
        "another in one invocation.",
        "",
        "| run | tasks/s | vs 1 process | data wait (% of train time) |",
        "|---|---:|---:|---:|",
    ]
    for name, r, tps in results:
        lines.append(f"| {name} | {tps:.1f} | {tps / base:.2f}x | "
                     f"{100 * r['data_wait_fraction']:.1f}% |")
    per_task = 1 / base  # seconds of 2-core compute per task, measured above
    ring_bytes = 2 * (2 - 1) / 2 * numel * 4
    lines += [
        "",
        "## Cost model",
        "",
        "Step time of N workers on M machines with meta-batch B, tasks split evenly:",
        "",
        "    t_step(N) = ceil(B / N) * t_task(cores per worker) + t_allreduce(N) + t_wait",
        "    t_allreduce(N) ~ 2 (N-1)/N * P * 4 bytes / bandwidth + 2 (N-1) * latency",
        "",
        f"- P = {numel:,} float32 values (Conv4-64 parameters + 3 metric sums): "
        f"{numel * 4 / 1e6:.2f} MB per all-reduce; a ring moves {ring_bytes / 1e6:.2f} MB "
        "per worker per step for N = 2.",
        f"- Measured here: t_task = {1e3 * per_task:.1f} ms on 2 cores (1 process); gloo "
        f"all-reduce of that buffer between 2 processes on loopback = "
        f"{1e3 * allreduce_s:.2f} ms, i.e. {100 * allreduce_s / (32 * per_task):.2f}% of a "
        "1-process step.",
        "- Prediction for 2 workers x 1 core on this 2-core machine: the same total compute, "
        "so the ratio to 1 process is the ratio of 1-thread to 2-thread efficiency, minus "
        "the all-reduce share; communication cannot matter at this model size. On M machines "
        f"at 10 Gb/s the ring term is ~{ring_bytes * 8 / 10e9 * 1e3:.2f} ms per step, "
        "against a compute term of B/N * t_task: the all-reduce stays negligible until "
        "B/N is a handful of tasks on a fast GPU.",
        "",
    ]
    table = "\n".join(lines)
    print(table)
    Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
