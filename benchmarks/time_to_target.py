"""Time to a target validation accuracy with 1 and 2 workers, side by side in one run.

Omniglot 5-way 1-shot second-order MAML (configs/omniglot_5w1s_maml.yaml: Conv4-64,
stride-2, meta-batch 32): one process with 2 threads, and Ray Train with 2 workers of 1
thread each fed by the episode actors (equal total CPU). Every run validates on 200
fixed episodes of the validation classes every `--val-every` steps; the time to target is
the training clock (`elapsed_s` in the history, validation included) at the first
validation at or above `--target`. The two runs follow one trajectory up to float32
summation order, so near a single target they can cross it a validation apart by noise;
the times to each of `--thresholds` are reported too, side by side.

    python benchmarks/time_to_target.py [--target 0.95] [--thresholds 0.90 0.93 0.95]
                                        [--steps 800] [--val-every 50]
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

ROOT = Path(__file__).resolve().parents[1]


def run(name: str, overrides: list[str], args, out: Path) -> dict:
    run_dir = out / name
    cmd = [sys.executable, "-m", "metadist.cli", "train",
           str(ROOT / "configs" / "omniglot_5w1s_maml.yaml"), f"data.dataset={args.data}",
           f"train.steps={args.steps}", f"train.val_every={args.val_every}",
           "train.val_episodes=200", "train.checkpoint_every=0", "train.final_test=false",
           "train.progress=false", "train.inner_loop=loop", "tracking.enabled=false",
           f"train.output_dir={run_dir}", *overrides]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    history = json.loads(next(run_dir.rglob("history.json")).read_text())
    vals = [(h["step"], h["elapsed_s"], h["val_accuracy"]) for h in history
            if "val_accuracy" in h]
    last = history[-1]
    return {"name": name, "hit": first_at(vals, args.target), "vals": vals, "wall": wall,
            "tasks_per_s": last.get("tasks_per_s"), "steps": last["step"]}


def first_at(vals: list[tuple[int, float, float]], target: float):
    """The first validation (step, elapsed_s, accuracy) at or above target, or None."""
    return next(((s, e, v) for s, e, v in vals if v >= target), None)


def reached(hit, row: dict) -> str:
    return f"step {hit[0]}, {hit[1] / 60:.2f} min" if hit else f"not reached in {row['steps']}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(ROOT / "data" / "omniglot"))
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.90, 0.93, 0.95])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--val-every", type=int, default=50)
    parser.add_argument("--out", default=str(ROOT / "runs" / "time_to_target"))
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"
                                                / "time_to_target.md"))
    args = parser.parse_args()
    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    load_before = os.getloadavg()
    rows = [
        run("1 process, 2 threads", ["workers=1", "train.threads=2"], args, out),
        run("Ray Train, 2 workers x 1 thread", ["workers=2", "ray.cpus_per_worker=1",
                                                "train.threads=1", "ray.actors=1"], args, out),
    ]
    load_after = os.getloadavg()
    base = rows[0]["hit"][1] if rows[0]["hit"] else None
    lines = [
        "# Time to target: 1 vs 2 workers",
        "",
        f"Machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; load average before/after "
        f"{load_before[0]:.1f}/{load_after[0]:.1f}.",
        f"Setting: Omniglot 5-way 1-shot second-order MAML (configs/omniglot_5w1s_maml.yaml), "
        f"target validation accuracy {args.target:.0%} on 200 fixed validation episodes, "
        f"checked every {args.val_every} steps; data `{args.data}`.",
        "",
        "| run | steps to target | time to target | vs 1 process | tasks/s | "
        "validation accuracy by step |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        curve = ", ".join(f"{s}: {v:.3f}" for s, _, v in r["vals"])
        if r["hit"]:
            step, elapsed, _ = r["hit"]
            ratio = f"{base / elapsed:.2f}x" if base else "—"
            lines.append(f"| {r['name']} | {step} | {elapsed / 60:.1f} min | {ratio} | "
                         f"{r['tasks_per_s']:.1f} | {curve} |")
        else:
            lines.append(f"| {r['name']} | not reached in {r['steps']} | — | — | "
                         f"{r['tasks_per_s']:.1f} | {curve} |")
    one, two = rows
    lines += ["", "Time to each threshold (first validation at or above it):", "",
              f"| threshold | {one['name']} | {two['name']} | speed-up |",
              "|---:|---|---|---:|"]
    for threshold in args.thresholds:
        a, b = first_at(one["vals"], threshold), first_at(two["vals"], threshold)
        speed = f"{a[1] / b[1]:.2f}x" if a and b else "—"
        lines.append(f"| {threshold:.0%} | {reached(a, one)} | {reached(b, two)} | {speed} |")
    table = "\n".join(lines) + "\n"
    print(table)
    Path(args.results).write_text(table)


if __name__ == "__main__":
    main()
