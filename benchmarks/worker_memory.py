"""The private memory of the processes a Ray run starts: the measurement behind the
preflight's floor (``PROCESS_MEMORY_FLOOR`` in ``metadist/runners/preflight.py``), the
least a run's process can hold, so that a run refused for memory could never have fit.

Starts ``metadist train configs/sinusoid_maml.yaml workers=2`` (the smallest worker: the
sinusoid MLP, no episode actors) on a local Ray, waits until both workers have trained
for a while, and reads each process's ``Private_Dirty`` and ``Pss`` from
``/proc/PID/smaps_rollup`` (Linux).

    python benchmarks/worker_memory.py [--settle 40]

Results: benchmarks/results/worker_memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from metadist.launch.reproduce import machine
from metadist.runners.preflight import PROCESS_MEMORY_FLOOR

ROOT = Path(__file__).resolve().parents[1]


def rollup(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value)  # kB
    return fields


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--settle", type=float, default=40.0,
                        help="seconds of training before measuring")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        runs = Path(out) / "runs"
        proc = subprocess.Popen(
            [sys.executable, "-m", "metadist.cli", "train",
             str(ROOT / "configs" / "sinusoid_maml.yaml"), "workers=2", "train.steps=1000000",
             "train.val_every=0", "train.inner_loop=loop", "tracking.enabled=false",
             f"train.output_dir={runs}"],
            cwd=out, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        try:
            deadline = time.time() + 180
            while len(list(runs.glob("*/workers/rank-*.pid"))) < 2:
                if time.time() > deadline or proc.poll() is not None:
                    raise SystemExit("the workers did not start")
                time.sleep(1)
            time.sleep(args.settle)
            workers = sorted(int(p.read_text()) for p in runs.glob("*/workers/rank-*.pid"))
            rows = [(pid, rollup(pid)) for pid in workers]
        finally:
            # SIGTERM: the run stops after its step and its driver shuts the local Ray
            # down (a SIGKILL would leave Ray's daemons running).
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    floor_mib = PROCESS_MEMORY_FLOOR / 2**20
    lines = [
        "# Private memory of a Ray Train worker",
        "",
        f"`python benchmarks/worker_memory.py --settle {args.settle:g}`: "
        "`metadist train configs/sinusoid_maml.yaml workers=2` on a local Ray (the "
        "smallest worker there is: the sinusoid MLP, no episode actors), measured after "
        f"{args.settle:g} s of training, from `/proc/PID/smaps_rollup`.",
        "",
        "| worker | Private_Dirty (MiB) | Pss (MiB) |",
        "|---|---:|---:|",
    ]
    for rank, (_, fields) in enumerate(rows):
        lines.append(f"| rank {rank} | {fields['Private_Dirty'] / 1024:.0f} | "
                     f"{fields['Pss'] / 1024:.0f} |")
    smallest = min(f["Private_Dirty"] / 1024 for _, f in rows)
    lines += ["", f"The preflight's floor, `PROCESS_MEMORY_FLOOR`: {floor_mib:.0f} MiB "
              f"({'below' if floor_mib <= smallest else 'ABOVE'} the smallest measured, "
              f"{smallest:.0f} MiB).", "", f"Machine: `{json.dumps(machine())}`.", ""]
    path = ROOT / "benchmarks" / "results" / "worker_memory.md"
    path.write_text("\n".join(lines))
    print(path.read_text())


if __name__ == "__main__":
    main()
