"""Does meta-training under bf16 autocast (`train.precision=bf16`) learn as well as fp32?

`benchmarks/mixed_precision_error.py` measures one meta-gradient's error; this trains.
Two single-process runs of one config (default Omniglot 5-way 1-shot second-order MAML on
real data) differ only in `train.precision`: same seed, same episodes, same steps. They
run side by side, one torch thread each, so both see the same machine load. Validation
and the meta-test run in fp32 in both (the trainer never autocasts evaluation), so the
scores compare the learned parameters alone.

On a CPU the tasks/s column is not the question (most CPUs emulate bf16 matmuls); on a
GPU it is. The accuracy columns are the question anywhere.

    python benchmarks/precision_training.py [--config configs/omniglot_5w1s_maml.yaml]
        [--data data/omniglot] [--steps 500] [--val-every 100] [--val-episodes 200]
        [--threads 1] [overrides...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "bf16")


def start(precision: str, args, extra: list[str], out: Path) -> subprocess.Popen:
    run_dir = out / precision
    cmd = [sys.executable, "-m", "metadist.worker", args.config, f"data.dataset={args.data}",
           f"train.steps={args.steps}", f"train.val_every={args.val_every}",
           f"train.val_episodes={args.val_episodes}", "train.checkpoint_every=0",
           "train.progress=false",
           f"train.threads={args.threads}", "tracking.enabled=false",
           f"train.output_dir={run_dir}", f"train.precision={precision}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir / "log.txt", "w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def collect(precision: str, out: Path) -> dict:
    result = json.loads(next((out / precision).rglob("result.json")).read_text())
    history = json.loads(next((out / precision).rglob("history.json")).read_text())
    vals = [(h["step"], h["val_accuracy"]) for h in history if "val_accuracy" in h]
    rates = [h["tasks_per_s"] for h in history if "tasks_per_s" in h]
    return {"precision": precision, "result": result, "vals": vals, "tasks_per_s": rates[-1],
            "train_loss": sum(h["train_loss"] for h in history[-50:]) / len(history[-50:])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(ROOT / "configs" / "omniglot_5w1s_maml.yaml"))
    parser.add_argument("--data", default=str(ROOT / "data" / "omniglot"))
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--val-episodes", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "runs" / "precision_training"))
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"
                                                / "precision_training.md"))
    args, extra = parser.parse_known_args()
    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    t0 = time.perf_counter()
    procs = {p: start(p, args, extra, out) for p in PRECISIONS}
    for precision, proc in procs.items():
        if proc.wait() != 0:
            log = (out / precision / "log.txt").read_text()
            raise SystemExit(f"{precision} run failed:\n{log[-3000:]}")
    rows = [collect(p, out) for p in PRECISIONS]
    minutes = (time.perf_counter() - t0) / 60
    r0 = rows[0]["result"]
    data = Path(args.data).resolve()
    data = data.relative_to(ROOT) if data.is_relative_to(ROOT) else data
    lines = [
        "# Meta-training in fp32 and under bf16 autocast, side by side",
        "",
        f"Command: `python benchmarks/precision_training.py {' '.join(sys.argv[1:])}`. "
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {args.threads} torch "
        f"thread(s) per run, both runs at once; torch {torch.__version__}, Python "
        f"{platform.python_version()}. Whole run {minutes:.1f} min.",
        f"Setting: `{Path(args.config).resolve().relative_to(ROOT)}` on `{data}`, "
        f"{args.steps} meta-steps from the config's train.seed in both; "
        f"validation on {args.val_episodes} fixed episodes every {args.val_every} steps; "
        f"meta-test on "
        f"{r0['episodes']} episodes of the {r0['split']} split (seed {r0['seed']}), "
        f"{r0['queries']} queries per class, 95% CI. Evaluation runs in fp32 in both.",
        "",
        "| train.precision | test accuracy (%) | validation accuracy by step (%) | "
        "train loss (last 50 steps) | tasks/s | train time |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        res = r["result"]
        curve = ", ".join(f"{s}: {100 * v:.1f}" for s, v in r["vals"])
        lines.append(f"| {r['precision']} | {100 * res['mean']:.2f} ± {100 * res['ci95']:.2f} | "
                     f"{curve} | {r['train_loss']:.4f} | {r['tasks_per_s']:.1f} | "
                     f"{res['train_seconds'] / 60:.1f} min |")
    table = "\n".join(lines) + "\n"
    print(table)
    Path(args.results).write_text(table)


if __name__ == "__main__":
    main()
