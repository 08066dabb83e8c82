"""How far a run moves when only the CPU's vector kernels change.

A seeded run repeats bit for bit on one machine (tests/test_train.py), yet re-runs of
reproduce rows recorded on other machines moved by up to ~1.9 confidence intervals. Which
kernels torch, oneDNN and MKL pick depends on the CPU's instruction sets, and each choice
rounds differently. Their environment switches stand in for another CPU here:

- ``ATEN_CPU_CAPABILITY``: torch's own vectorised kernels (elementwise ops, reductions,
  batch norm, the optimizers' arithmetic);
- ``ONEDNN_MAX_CPU_ISA``: oneDNN's kernels, which run torch's CPU convolutions;
- ``MKL_ENABLE_INSTRUCTIONS``: MKL's GEMM (linear layers).

Every variant trains the same seeded config in a fresh process (``python -m
metadist.worker``, one torch thread, no MLflow). The table compares each variant's final
parameters with the reference's and, with ``--test``, their meta-test accuracy. The
reference runs twice: the second run must match the first bit for bit, or the comparison
means nothing.

    python benchmarks/cpu_kernels.py --row omniglot-background-evaluation-20w1s-reptile \\
        --steps 40 > benchmarks/results/cpu_kernels.md
    python benchmarks/cpu_kernels.py --row ROW --test --variants default,avx2 ...

``--row`` takes a reproduce row's config and its CPU-budget overrides; ``--steps`` shortens
it. Extra ``key=value`` arguments are passed on to the config.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from metadist.launch.reproduce import load_rows, machine
from metadist.training.checkpoint import load_checkpoint

# --variants name: (table label, environment switches)
VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "default": ("default", {}),
    "again": ("default again", {}),
    "aten-avx2": ("torch AVX2", {"ATEN_CPU_CAPABILITY": "avx2"}),
    "onednn-avx512": ("oneDNN AVX-512 (no AMX/VNNI)", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}),
    "onednn-avx2": ("oneDNN AVX2", {"ONEDNN_MAX_CPU_ISA": "AVX2"}),
    "mkl-avx512": ("MKL AVX-512", {"MKL_ENABLE_INSTRUCTIONS": "AVX512"}),
    "mkl-avx2": ("MKL AVX2", {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}),
    "avx2": ("all AVX2 (an AVX2-only CPU)", {"ATEN_CPU_CAPABILITY": "avx2",
                                             "ONEDNN_MAX_CPU_ISA": "AVX2",
                                             "MKL_ENABLE_INSTRUCTIONS": "AVX2"}),
}
SWITCHES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def train(config: str, overrides: list[str], env: dict[str, str], run_dir: Path) -> float:
    child = {k: v for k, v in os.environ.items() if k not in SWITCHES} | env
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "metadist.worker", config, *overrides,
                    "--run-dir", str(run_dir)], env=child, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def params(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "final.pt")["params"]


def compare(ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict:
    if ref.keys() != other.keys():
        raise SystemExit(f"parameter names differ: {sorted(ref)} vs {sorted(other)}")
    diff = torch.cat([(other[k] - ref[k]).flatten() for k in ref])
    norm = torch.cat([ref[k].flatten() for k in ref]).norm()
    return {"equal": all(torch.equal(ref[k], other[k]) for k in ref),
            "max_abs": diff.abs().max().item(), "rel_l2": (diff.norm() / norm).item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--row", required=True, help="a reproduce row id")
    ap.add_argument("--steps", type=int, help="meta-steps (default: the row's CPU budget)")
    ap.add_argument("--test", action="store_true", help="also meta-test every variant")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated, from {list(VARIANTS)}; the first is the reference")
    ap.add_argument("--keep", type=Path, help="keep the runs here (default: a temp dir)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="variants trained at once (one torch thread each)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    rows = {r.id: r for t in load_rows().values() for r in t}
    if args.row not in rows:
        raise SystemExit(f"--row {args.row!r} is not a reproduce row; one of {sorted(rows)}")
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
    row = rows[args.row]
    overrides = [*row.overrides, *row.budget["cpu"],
                 *([f"train.steps={args.steps}"] if args.steps else []),
                 "train.threads=1", "train.inner_loop=loop", "train.progress=false",
                 "tracking.enabled=false", f"train.final_test={str(args.test).lower()}",
                 *args.overrides]
    out = args.keep or Path(tempfile.mkdtemp(prefix="cpu_kernels-"))

    def one(short: str) -> tuple:
        name, env = VARIANTS[short]
        seconds = train(str(row.config), overrides, env, out / short)
        print(f"{name}: {seconds:.0f} s", file=sys.stderr, flush=True)
        return name, env, out / short, seconds, json.loads(
            (out / short / "result.json").read_text())

    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(one, args.variants.split(",")))

    ref_name, _, ref_dir, _, ref_result = runs[0]
    ref = params(ref_dir)
    m = machine()
    steps = ref_result.get("steps")
    lines = [
        "# A run's parameters when only the CPU's vector kernels change",
        "",
        f"Generated by `python benchmarks/cpu_kernels.py {' '.join(sys.argv[1:])}` on "
        f"{time.strftime('%Y-%m-%d')}.",
        f"Machine: {m.get('cpu_model')}, {m['cpus']} cores; instruction sets: "
        f"{m.get('cpu_isa')}; torch {m['torch']} (its kernel choice here: "
        f"{m['cpu_capability']}).",
        f"Run: row `{row.id}` ({row.config.name}, {' '.join(overrides)}), {steps} "
        f"meta-steps, one torch thread, each variant in a fresh process, {args.jobs} at a "
        f"time. Differences are against the reference ({ref_name}) over all parameters: "
        "max |Δ| and ‖Δ‖/‖θ‖.",
        "",
    ]
    header = "| variant | environment | bitwise equal | max abs diff | relative L2 diff |"
    rule = "|---|---|---|---:|---:|"
    if args.test:
        header += " test accuracy (%) | Δ points | Δ / CI |"
        rule += "---:|---:|---:|"
    lines += [header + " time |", rule + "---:|"]
    for name, env, run_dir, seconds, result in runs:
        c = compare(ref, params(run_dir))
        env_text = " ".join(f"{k}={v}" for k, v in env.items()) or "(none)"
        line = (f"| {name} | {env_text} | {'yes' if c['equal'] else 'no'} | "
                f"{c['max_abs']:.2e} | {c['rel_l2']:.2e} |")
        if args.test:
            delta = 100 * (result["mean"] - ref_result["mean"])
            line += (f" {100 * result['mean']:.2f} ± {100 * result['ci95']:.2f} | "
                     f"{delta:+.2f} | {delta / (100 * ref_result['ci95']):+.2f} |")
        lines.append(line + f" {seconds:.0f} s |")
    if args.test:
        lines += ["", f"Test protocol: {ref_result['split']} split, {ref_result['episodes']} "
                  f"episodes (seed {ref_result['seed']}), {ref_result['queries']} queries per "
                  "class, 95% CI, transductive batch norm."]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
