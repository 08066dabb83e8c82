"""Meta-training throughput: metadist's per-task loop and vmap inner loop, and learn2learn.

Two 5-way 1-shot settings, 15 queries per class, each as the project's config has it:
- omniglot (configs/omniglot_5w1s_maml.yaml): Conv4-64 on 28x28, mean readout, meta-batch
  32, 1 inner step of α=0.4; both Conv4 variants (2x2 max-pool, as in the paper's text,
  and stride-2 convolutions, as in Finn's Omniglot code);
- miniimagenet (configs/miniimagenet_5w1s_maml.yaml): Conv4-32 with 2x2 max-pool on 84x84
  RGB, flattened features, meta-batch 4, 5 inner steps of α=0.01 (Finn et al. 2017).
MAML (second order), first-order MAML and Reptile run with the same inner-loop settings.
Paths: ``loop`` (metadist, one task after another), ``vmap:C`` (metadist, torch.func.vmap
over chunks of C tasks, 0 = all at once) and ``l2l`` (learn2learn's own loop, run by the
interpreter given as --l2l-python; see l2l_reference.py). Every row runs in its own
process (so its peak memory is its own) on one meta-batch saved beforehand, one row after
another in this one run, beside this machine's float32 matmul ceiling.

The main measure is the CPU time a meta-training step costs the process (process_time),
with one torch thread by default, as metadist's Ray workers run: on a machine shared with
other jobs it stays put where wall-clock time swings with their load (both are reported).

    python benchmarks/inner_loop_throughput.py [--settings omniglot,miniimagenet]
        [--steps 3] [--l2l-python /tmp/l2l/bin/python] [--random-data]
        [--pools max,stride] [--algorithms maml,fomaml,reptile] [--paths loop,vmap:0,l2l]

Default paths: Omniglot loop, vmap:4, l2l; miniImageNet loop, vmap:0 (its 4 tasks at once),
l2l. Without the converted dataset (or with --random-data) the rows run on random tensors of
the right shape: throughput does not depend on pixel values.

FLOPs per step are counted once per (setting, Conv4, algorithm) by torch's FlopCounterMode
on metadist's loop path (matmul/conv/bmm FLOPs of forward and backward): the work the
algorithm needs, so the achieved GFLOP/s of all paths compare the same work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BATCH_KEYS = ("support_x", "support_y", "query_x", "query_y")


@dataclass(frozen=True)
class Setting:
    title: str
    config: str
    pools: str
    paths: str
    image_shape: tuple[int, int, int]  # of the random tensors used without the dataset


SETTINGS = {
    "omniglot": Setting("Omniglot 5-way 1-shot", "configs/omniglot_5w1s_maml.yaml",
                        "max,stride", "loop,vmap:4,l2l", (1, 28, 28)),
    "miniimagenet": Setting("miniImageNet 5-way 1-shot", "configs/miniimagenet_5w1s_maml.yaml",
                            "max", "loop,vmap:0,l2l", (3, 84, 84)),
}


def matmul_ceiling(n: int = 4096, repeats: int = 5) -> float:
    """FLOPs per CPU-second of a float32 matmul: per core, with one thread."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        a @ b
        best = min(best, time.process_time() - t0)
    return 2 * n**3 / best


def prepare(setting: Setting, random_data: bool, out_dir: Path) -> dict:
    """The row spec (from the setting's config) and one meta-batch saved for the rows."""
    from metadist.config import load_config

    cfg = load_config(ROOT / setting.config)
    data, model, alg = cfg.data, cfg.model, cfg.algorithm
    dataset = ROOT / data.dataset
    meta_batch = alg.meta_batch_size
    if dataset.is_dir() and not random_data:
        from metadist.training.streams import open_streams

        data.dataset = str(dataset)
        batch = open_streams(data, train_seed=0, eval_seed=1).train.meta_batch(0, meta_batch)
        source = f"real episodes from {data.dataset}"
    else:
        batch = random_meta_batch(data, setting.image_shape, meta_batch, seed=0)
        source = "random tensors (throughput does not depend on pixel values)"
    path = out_dir / f"{Path(setting.config).stem}.pt"
    torch.save(dict(zip(BATCH_KEYS, batch)), path)
    channels, size = batch.support_x.shape[2], batch.support_x.shape[-1]
    return {"ways": data.ways, "shots": data.shots, "queries": data.queries,
            "in_channels": channels, "image_size": size, "hidden": model.hidden,
            "readout": model.readout, "meta_batch": meta_batch, "inner_lr": alg.inner_lr,
            "inner_steps": alg.inner_steps, "batch_file": str(path), "source": source}


def random_meta_batch(data, image_shape: tuple[int, int, int], meta_batch: int, seed: int):
    """Random images of an episode's shape (``data``: a DataConfig) with its labels."""
    from metadist.data.episodes import MetaBatch

    g = torch.Generator().manual_seed(seed)
    ways, shots, queries = data.ways, data.shots, data.queries
    return MetaBatch(
        torch.randn(meta_batch, ways * shots, *image_shape, generator=g),
        torch.arange(ways).repeat(shots).expand(meta_batch, -1).clone(),
        torch.randn(meta_batch, ways * queries, *image_shape, generator=g),
        torch.arange(ways).repeat(queries).expand(meta_batch, -1).clone(),
    )


def run_one(row: dict) -> dict:
    """One row, in this (child) process."""
    torch.set_num_threads(row["threads"])
    batch = torch.load(row["batch_file"], weights_only=True)
    if row["path"] == "l2l":
        from l2l_reference import make_meta_step

        meta_step = make_meta_step(row, row["algorithm"], batch)
    else:
        meta_step, count_flops = _metadist_step(row, batch)

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    meta_step()  # warm-up
    times, cpu_times = [], []
    for _ in range(row["steps"]):
        t0, c0 = time.perf_counter(), time.process_time()
        meta_step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    flops = count_flops() if row["count_flops"] else None
    seconds = sorted(times)[len(times) // 2]  # median step
    cpu_seconds = sorted(cpu_times)[len(cpu_times) // 2]
    return {"seconds_per_step": seconds, "tasks_per_s": row["meta_batch"] / seconds,
            "tasks_per_cpu_s": row["meta_batch"] / cpu_seconds,
            "peak_rss_mb": rss_peak / 1024, "step_rss_mb": (rss_peak - rss_before) / 1024,
            "flops_per_step": flops}


def _metadist_step(row: dict, batch: dict):
    from torch.utils.flop_counter import FlopCounterMode

    from metadist.algorithms import MetaStep, meta_gradient
    from metadist.data.episodes import MetaBatch
    from metadist.models import Conv4

    batch = MetaBatch(**batch)
    inner_loop, _, chunk = row["path"].partition(":")
    model = Conv4(ways=row["ways"], in_channels=row["in_channels"], hidden=row["hidden"],
                  image_size=row["image_size"], pool=row["pool"], readout=row["readout"])
    params = {k: v.requires_grad_() for k, v in model.init_params().items()}
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)
    step = MetaStep(row["algorithm"], inner_lr=row["inner_lr"], inner_steps=row["inner_steps"])

    def meta_step() -> None:
        grads, _ = meta_gradient(model, params, batch, step, inner_loop=inner_loop,
                                 chunk=int(chunk or 0))
        for k, p in params.items():
            p.grad = grads[k] / row["meta_batch"]
        optimizer.step()

    def count_flops() -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            meta_gradient(model, params, batch, step, inner_loop="loop")
        return counter.get_total_flops()

    return meta_step, count_flops


def probe_l2l(python: str) -> str | None:
    """learn2learn's and torch's versions under ``python``, or None if it cannot import them."""
    probe = "import learn2learn, torch; print(learn2learn.__version__, torch.__version__)"
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        print(f"learn2learn rows left out: {python} cannot import it ({last})", flush=True)
        return None
    l2l_version, torch_version = out.stdout.split()[-2:]
    return f"learn2learn {l2l_version} with torch {torch_version} ({python})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="omniglot,miniimagenet")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--algorithms", default="maml,fomaml,reptile")
    parser.add_argument("--pools", default=None, help="override the settings' Conv4 variants")
    parser.add_argument("--paths", default=None, help="override the settings' paths")
    parser.add_argument("--l2l-python", default=sys.executable,
                        help="interpreter that has learn2learn (see l2l_reference.py)")
    parser.add_argument("--random-data", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"
                                             / "inner_loop_throughput.md"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one row (JSON)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    l2l = probe_l2l(args.l2l_python)
    ceiling = matmul_ceiling()
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings.split(","):
            setting = SETTINGS[name]
            spec = prepare(setting, args.random_data, Path(tmp))
            rows, flops = [], {}
            for pool in (args.pools or setting.pools).split(","):
                for algorithm in args.algorithms.split(","):
                    for path in (args.paths or setting.paths).split(","):
                        if path == "l2l" and l2l is None:
                            continue
                        row = {**spec, "pool": pool, "algorithm": algorithm, "path": path,
                               "steps": args.steps, "threads": args.threads,
                               "count_flops": path != "l2l" and (pool, algorithm) not in flops}
                        python = args.l2l_python if path == "l2l" else sys.executable
                        out = subprocess.run([python, __file__, "--one", json.dumps(row)],
                                             capture_output=True, text=True)
                        if out.returncode != 0:
                            sys.exit(f"row {name} {pool} {algorithm} {path} failed:\n"
                                     f"{out.stderr[-3000:]}")
                        row.update(json.loads(out.stdout.strip().splitlines()[-1]))
                        if row["flops_per_step"] is not None:
                            flops[(pool, algorithm)] = row["flops_per_step"]
                        rows.append(row)
                        print(f"{name:12s} {pool:6s} {algorithm:8s} {path:7s} "
                              f"{row['tasks_per_s']:7.1f} tasks/s "
                              f"{row['tasks_per_cpu_s']:7.1f} tasks/CPU-s "
                              f"{row['peak_rss_mb']:6.0f} MB peak", flush=True)
            sections.append((setting, spec, rows, flops))
    ceiling = max(ceiling, matmul_ceiling())
    text = render(sections, ceiling, args, l2l, load_before, os.getloadavg())
    print(text)
    Path(args.out).write_text(text)


def render(sections, ceiling, args, l2l, load_before, load_after) -> str:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = "load average (1/5/15 min) before {} and after {}".format(
        *("/".join(f"{x:.1f}" for x in avg) for avg in (load_before, load_after)))
    lines = [
        "# Meta-training throughput: metadist loop vs vmap vs learn2learn",
        "",
        f"Machine: {platform.machine()} {cpu}, {os.cpu_count()} cores, torch threads per "
        f"row: {args.threads}, torch {torch.__version__}, Python {platform.python_version()}; "
        f"{load}.",
        f"Ceiling: float32 4096x4096 matmul = {ceiling / 1e9:.0f} GFLOP per CPU-second "
        "(same run).",
        f"learn2learn: {l2l or f'not importable by {args.l2l_python}: rows left out'}; "
        "`pip install learn2learn` (0.2.0) fails to build on Python 3.11, so it runs from a "
        "venv of its own built as benchmarks/l2l_reference.py describes.",
        f"Median of {args.steps} meta-training steps (meta-gradient + Adam) after a warm-up, "
        "each row in its own process. tasks/CPU-s: tasks per CPU-second of the process "
        "(the main measure; `vs loop` compares it); tasks/s: per wall-clock second, which "
        "other jobs' load lowers. Peak RSS is the process's; step RSS what the steps added "
        "to it (0: they fit in memory the process had already touched).",
    ]
    for setting, spec, rows, flops in sections:
        size = spec["image_size"]
        lines += [
            "",
            f"## {setting.title}",
            "",
            f"{setting.config}: Conv4-{spec['hidden']} on {size}x{size}x{spec['in_channels']}, "
            f"{spec['readout']} readout, {spec['queries']} queries/class, meta-batch "
            f"{spec['meta_batch']}, {spec['inner_steps']} inner step(s) of α={spec['inner_lr']} "
            f"for every algorithm; data: {spec['source']}.",
            "",
            "| Conv4 | algorithm | path | tasks/CPU-s | vs loop | tasks/s (wall) | GFLOP/step "
            "| GFLOP/CPU-s | % of ceiling | peak RSS MB | step RSS MB |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        loop_rate = {(r["pool"], r["algorithm"]): r["tasks_per_cpu_s"]
                     for r in rows if r["path"] == "loop"}
        for r in rows:
            key = (r["pool"], r["algorithm"])
            f = flops.get(key)
            ratio = r["tasks_per_cpu_s"] / loop_rate.get(key, float("nan"))
            if f is None:
                work = "— | — | —"
            else:
                rate = f * r["tasks_per_cpu_s"] / r["meta_batch"]
                work = f"{f / 1e9:.1f} | {rate / 1e9:.1f} | {100 * rate / ceiling:.0f}%"
            pool = "max-pool" if r["pool"] == "max" else "stride-2"
            lines.append(
                f"| {pool} | {r['algorithm']} | {r['path']} | {r['tasks_per_cpu_s']:.2f} "
                f"| {ratio:.2f}x | {r['tasks_per_s']:.2f} | {work} | {r['peak_rss_mb']:.0f} "
                f"| {r['step_rss_mb']:.0f} |")
    lines += ["", "Paths: `loop` = metadist, one task after another; `vmap:C` = metadist, "
              "torch.func.vmap over chunks of C tasks (0 = the whole meta-batch at once); "
              "`l2l` = learn2learn's own loop (MAML.clone/adapt, Reptile by copy + SGD), "
              "benchmarks/l2l_reference.py.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
