"""Meta-training throughput of the per-task loop vs the vectorised (vmap) inner loop.

Omniglot 5-way 1-shot, 15 queries per class, Conv4 with 64 filters on 28x28, meta-batch 32;
MAML (second order), first-order MAML and Reptile; both Conv4 variants (2x2 max-pool, as
in the paper's text, and stride-2 convolutions, as in Finn's Omniglot code). Every row
runs in its own process (so peak memory is its own), one after another in this one run,
beside this machine's float32 matmul ceiling measured in the same run.

    python benchmarks/inner_loop_throughput.py [--data data/omniglot] [--steps 3]

FLOPs per step are counted once per (model, algorithm) by torch's FlopCounterMode on the
loop path (matmul/conv/bmm FLOPs of forward and backward): the work the algorithm needs,
so achieved GFLOP/s of the two paths compare the same work.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def matmul_ceiling(n: int = 4096, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def episodes(data: str | None, meta_batch: int):
    from metadist.data.episodes import MetaBatch

    if data:
        from metadist.config import DataConfig
        from metadist.data.streams import open_streams

        streams = open_streams(DataConfig(dataset=data, ways=5, shots=1, queries=15),
                               train_seed=0, eval_seed=1)
        return streams.train.meta_batch(0, meta_batch)
    g = torch.Generator().manual_seed(0)
    return MetaBatch(
        torch.randn(meta_batch, 5, 1, 28, 28, generator=g),
        torch.arange(5).expand(meta_batch, -1).clone(),
        torch.randn(meta_batch, 75, 1, 28, 28, generator=g),
        torch.arange(5).repeat(15).expand(meta_batch, -1).clone(),
    )


def run_one(args: argparse.Namespace) -> dict:
    """One row, in this (child) process."""
    from torch.utils.flop_counter import FlopCounterMode

    from metadist.algorithms import MetaStep, meta_gradient
    from metadist.models import Conv4

    torch.set_num_threads(args.threads)
    batch = episodes(args.data, args.meta_batch)
    model = Conv4(ways=5, hidden=64, image_size=28, pool=args.pool)
    params = {k: v.requires_grad_() for k, v in model.init_params().items()}
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)
    step = MetaStep(args.algorithm, inner_lr=0.4, inner_steps=1)

    def meta_step() -> None:
        grads, _ = meta_gradient(model, params, batch, step, inner_loop=args.inner_loop,
                                 chunk=args.chunk)
        for k, p in params.items():
            p.grad = grads[k] / args.meta_batch
        optimizer.step()

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    meta_step()  # warm-up
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        meta_step()
        times.append(time.perf_counter() - t0)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    flops = None
    if args.count_flops:
        counter = FlopCounterMode(display=False)
        with counter:
            meta_gradient(model, params, batch, step, inner_loop="loop")
        flops = counter.get_total_flops()
    seconds = sorted(times)[len(times) // 2]  # median step
    return {"seconds_per_step": seconds, "tasks_per_s": args.meta_batch / seconds,
            "peak_rss_mb": rss_peak / 1024, "step_rss_mb": (rss_peak - rss_before) / 1024,
            "flops_per_step": flops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "data" / "omniglot")
                        if (ROOT / "data" / "omniglot").is_dir() else None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--pools", default="max,stride")
    parser.add_argument("--algorithms", default="maml,fomaml,reptile")
    parser.add_argument("--paths", default="loop,vmap:0,vmap:4")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"
                                             / "inner_loop_throughput.md"))
    # internal: run one row
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pool", default="max", help=argparse.SUPPRESS)
    parser.add_argument("--algorithm", default="maml", help=argparse.SUPPRESS)
    parser.add_argument("--inner-loop", default="loop", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count-flops", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return

    torch.set_num_threads(args.threads)
    ceiling = matmul_ceiling()
    rows, flops = [], {}
    for pool in args.pools.split(","):
        for algorithm in args.algorithms.split(","):
            for path in args.paths.split(","):
                inner_loop, _, chunk = path.partition(":")
                cmd = [sys.executable, __file__, "--one", "--pool", pool, "--algorithm",
                       algorithm, "--inner-loop", inner_loop, "--chunk", chunk or "0",
                       "--steps", str(args.steps), "--meta-batch", str(args.meta_batch),
                       "--threads", str(args.threads)]
                if args.data:
                    cmd += ["--data", args.data]
                if (pool, algorithm) not in flops:
                    cmd.append("--count-flops")
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                flops.setdefault((pool, algorithm), row["flops_per_step"])
                row.update(pool=pool, algorithm=algorithm, path=path)
                rows.append(row)
                print(f"{pool:6s} {algorithm:8s} {path:8s} {row['tasks_per_s']:7.1f} tasks/s",
                      flush=True)
    ceiling = max(ceiling, matmul_ceiling())
    table = render(rows, flops, ceiling, args)
    print(table)
    Path(args.out).write_text(table)


def render(rows, flops, ceiling, args) -> str:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    source = "real Omniglot episodes" if args.data else "random tensors"
    lines = [
        "# Inner-loop throughput: per-task loop vs vmap",
        "",
        f"Machine: {platform.machine()} {cpu}, {args.threads} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}.",
        f"Setting: Omniglot 5-way 1-shot, 15 queries/class, Conv4-64 on 28x28, meta-batch "
        f"{args.meta_batch}, 1 inner step; data: {source}; "
        f"median of {args.steps} steps after a warm-up, each row in its own process.",
        f"Ceiling: float32 4096x4096 matmul = {ceiling / 1e9:.0f} GFLOP/s (same run).",
        "",
        "| Conv4 | algorithm | path | tasks/s | vs loop | GFLOP/step | GFLOP/s | % of ceiling "
        "| peak RSS MB | step RSS MB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    loop_rate = {(r["pool"], r["algorithm"]): r["tasks_per_s"] for r in rows if r["path"] == "loop"}
    for r in rows:
        f = flops[(r["pool"], r["algorithm"])]
        achieved = f / r["seconds_per_step"]
        ratio = r["tasks_per_s"] / loop_rate.get((r["pool"], r["algorithm"]), float("nan"))
        pool = "max-pool" if r["pool"] == "max" else "stride-2"
        lines.append(
            f"| {pool} | {r['algorithm']} | {r['path']} | {r['tasks_per_s']:.1f} | {ratio:.2f}x "
            f"| {f / 1e9:.1f} | {achieved / 1e9:.1f} | {100 * achieved / ceiling:.0f}% "
            f"| {r['peak_rss_mb']:.0f} | {r['step_rss_mb']:.0f} |"
        )
    lines += ["", "path `vmap:C` = torch.func.vmap over chunks of C tasks (0 = the whole "
              "meta-batch at once).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
