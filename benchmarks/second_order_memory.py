"""Peak memory and time per task of second-order MAML on ResNet-12, side by side.

miniImageNet-shaped 5-way 1-shot tasks (84x84x3, 15 queries per class), 5 inner SGD steps
of α=0.01, ResNet-12 at Meta-Baseline's widths 64-160-320-640 (``--widths`` for a
smaller one), one meta-gradient over ``--tasks`` tasks per run. Rows:

- ``loop``: metadist's per-task loop, every inner step's graph kept (plain second order);
- ``loop, steps recomputed``: the same with ``train.recompute_inner`` (the inner steps
  are recomputed in the outer backward, ``metadist/algorithms/recompute.py``);
- ``loop, steps and query blocks recomputed``: and ``train.recompute_query`` (the query
  forward keeps each residual block's input alone and reruns the block in the outer
  backward, ``metadist.algorithms.meta.block_remat``);
- ``vmap, chunk C``: ``torch.func.vmap`` over C tasks at a time (``train.chunk``; ``all``:
  every task's graph at once, what summing the tasks' losses before one backward costs),
  kept, steps recomputed, steps and query blocks recomputed;
- ``torch.utils.checkpoint``: MAML written out with ``checkpoint(use_reentrant=False)``
  around each inner step (``torch.autograd.grad(create_graph=True)`` inside), the
  alternative the recomputation module explains it does not use;
- ``learn2learn``: learn2learn's ``MAML(first_order=False)``, ``clone()``/``adapt()`` per
  task and the query loss's ``backward()``, on the same ResNet-12 as an ``nn.Module`` with
  metadist's initial parameters, if the interpreter can import learn2learn.

Every row runs in a fresh process. On a CPU, the peak is the process's peak RSS (VmHWM,
what ``getrusage``'s ru_maxrss reports, reset at the baseline) minus its RSS at the
baseline (after torch, the model, its parameters and the batch are loaded; freed heap
trimmed), with glibc's mmap threshold fixed at ``--malloc-mmap-threshold`` bytes (64 KiB;
0: glibc's own, which moves up to 32 MiB), so that a freed tensor leaves the RSS instead
of a heap whose fragmentation differs from row to row; on CUDA,
``torch.cuda.max_memory_allocated`` over what was allocated at the baseline. The warm-up
run counts towards the peak; the time per task is the timed runs' median over the tasks.
Each row's meta-gradient is compared with the first row's (``loop``).

    python benchmarks/second_order_memory.py [--widths 64,160,320,640] [--tasks 4]
        [--steps 5] [--device auto] [--chunks all,1,2] [--repeats 1] [--threads 0]
        [--rows loop,loop-recompute,loop-recompute-all,vmap,vmap-recompute,
                vmap-recompute-all,torch-checkpoint,l2l]
        [--l2l-python PYTHON] [--malloc-mmap-threshold 65536]
        [--out benchmarks/results/second_order_memory.md]

A quick smoke run: ``--widths 8,8,16,16 --tasks 2 --steps 2 --out /tmp/smoke.md``.

learn2learn 0.2.0 does not ``pip install`` on Python 3.11 (its shipped Cython C files need
``longintrepr.h``); built in place it imports with this venv's torch:

    pip download --no-deps --no-binary :all: -d /tmp/l2lsrc learn2learn==0.2.0
    pip install --target /tmp/l2lbuild cython gym && rm -rf /tmp/l2lbuild/numpy*
    cd /tmp/l2lsrc && tar xzf learn2learn-0.2.0.tar.gz && cd learn2learn-0.2.0
    rm learn2learn/data/*.c && PYTHONPATH=/tmp/l2lbuild python setup.py build_ext --inplace

then run this script with ``PYTHONPATH=/tmp/l2lbuild:/tmp/l2lsrc/learn2learn-0.2.0``.
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
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the child of another interpreter (--l2l-python)
ROW_KINDS = ("loop", "loop-recompute", "loop-recompute-all", "vmap", "vmap-recompute",
             "vmap-recompute-all", "torch-checkpoint", "l2l")


# -- the rows, each in its own process ------------------------------------------------------


def build(spec: dict):
    """metadist's ResNet-12, its initial parameters and a random miniImageNet-shaped
    meta-batch, on the row's device."""
    from metadist.data.episodes import MetaBatch
    from metadist.models import ResNet12

    device = torch.device(spec["device"])
    model = ResNet12(ways=spec["ways"], in_channels=3, widths=tuple(spec["widths"]))
    dtype = getattr(torch, spec["dtype"])
    params = {k: v.to(device, dtype).requires_grad_()
              for k, v in model.init_params(torch.Generator().manual_seed(0)).items()}
    g = torch.Generator().manual_seed(1)
    size, ways, tasks = spec["image_size"], spec["ways"], spec["tasks"]

    def labels(per_class: int) -> torch.Tensor:
        return torch.arange(ways).repeat(per_class).expand(tasks, -1).clone()

    batch = MetaBatch(
        torch.randn(tasks, ways * spec["shots"], 3, size, size, generator=g, dtype=dtype),
        labels(spec["shots"]),
        torch.randn(tasks, ways * spec["queries"], 3, size, size, generator=g, dtype=dtype),
        labels(spec["queries"]))
    return model, params, MetaBatch(*(t.to(device) for t in batch))


def metadist_row(row: dict, model, params, batch):
    from metadist.algorithms import MetaStep, meta_gradient

    step = MetaStep("maml", inner_lr=row["inner_lr"], inner_steps=row["steps"])
    inner_loop = "vmap" if row["kind"].startswith("vmap") else "loop"

    def run() -> dict[str, torch.Tensor]:
        return meta_gradient(model, params, batch, step, inner_loop=inner_loop,
                             chunk=row.get("chunk", 0),
                             recompute="-recompute" in row["kind"],
                             recompute_query=row["kind"].endswith("-all"))[0]

    return run, {}


def torch_checkpoint_row(row: dict, model, params, batch):
    """MAML written out, each inner step inside ``torch.utils.checkpoint``."""
    from torch.utils.checkpoint import checkpoint

    from metadist.algorithms import task_loss

    names, lr, runs = list(params), row["inner_lr"], {"step runs": 0}

    def step(sx: torch.Tensor, sy: torch.Tensor, *values: torch.Tensor
             ) -> tuple[torch.Tensor, ...]:
        runs["step runs"] += 1
        loss = task_loss(model, dict(zip(names, values)), sx, sy)
        grads = torch.autograd.grad(loss, values, create_graph=True)
        return tuple(v - lr * g for v, g in zip(values, grads))

    def run() -> dict[str, torch.Tensor]:
        total = [torch.zeros_like(p) for p in params.values()]
        for t in range(batch.support_x.shape[0]):
            values = tuple(params.values())
            for _ in range(row["steps"]):
                values = checkpoint(step, batch.support_x[t], batch.support_y[t], *values,
                                    use_reentrant=False)
            loss = task_loss(model, dict(zip(names, values)), batch.query_x[t],
                             batch.query_y[t])
            for i, g in enumerate(torch.autograd.grad(loss, list(params.values()))):
                total[i] += g
        return dict(zip(names, total))

    return run, runs


def l2l_row(row: dict, model, params, batch):
    """learn2learn's MAML recipe on the same ResNet-12 as an nn.Module."""
    import learn2learn as l2l
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):  # Meta-Baseline's block, batch norm with the batch's statistics
        def __init__(self, cin: int, cout: int) -> None:
            super().__init__()
            for j, c in enumerate((cin, cout, cout), start=1):
                setattr(self, f"conv{j}", nn.Conv2d(c, cout, 3, padding=1, bias=False))
                setattr(self, f"bn{j}", nn.BatchNorm2d(cout, track_running_stats=False))
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, bias=False),
                nn.BatchNorm2d(cout, track_running_stats=False))

        def forward(self, x):
            out = F.leaky_relu(self.bn1(self.conv1(x)), 0.1)
            out = F.leaky_relu(self.bn2(self.conv2(out)), 0.1)
            out = self.bn3(self.conv3(out))
            return F.max_pool2d(F.leaky_relu(out + self.downsample(x), 0.1), 2)

    class Net(nn.Module):
        def __init__(self, widths, ways: int) -> None:
            super().__init__()
            channels = [3, *widths]
            for i in range(4):
                setattr(self, f"layer{i + 1}", Block(channels[i], channels[i + 1]))
            self.head = nn.Linear(widths[-1], ways)

        def forward(self, x):
            for i in range(4):
                x = getattr(self, f"layer{i + 1}")(x)
            return self.head(x.mean(dim=(2, 3)))

    net = Net(row["widths"], row["ways"]).to(params["head.bias"].device,
                                             params["head.bias"].dtype)
    missing, unexpected = net.load_state_dict({k: v.detach() for k, v in params.items()},
                                              strict=True)
    assert not missing and not unexpected
    maml = l2l.algorithms.MAML(net, lr=row["inner_lr"], first_order=False)
    names = [k for k, _ in net.named_parameters()]

    def run() -> dict[str, torch.Tensor]:
        maml.zero_grad()
        for t in range(batch.support_x.shape[0]):
            learner = maml.clone()
            for _ in range(row["steps"]):
                learner.adapt(F.cross_entropy(learner(batch.support_x[t]), batch.support_y[t]))
            F.cross_entropy(learner(batch.query_x[t]), batch.query_y[t]).backward()
        return {k: p.grad.detach().clone() for k, p in zip(names, maml.parameters())}

    return run, {"learn2learn": l2l.__version__}


def run_row(row: dict) -> dict:
    """One row, in this (child) process."""
    from metadist.training.memory import peak_memory

    if row["threads"]:
        torch.set_num_threads(row["threads"])
    model, params, batch = build(row)
    make = {"torch-checkpoint": torch_checkpoint_row, "l2l": l2l_row}.get(row["kind"],
                                                                          metadist_row)
    run, notes = make(row, model, params, batch)
    device = torch.device(row["device"])
    times: list[float] = []

    def runs() -> dict[str, torch.Tensor]:
        grads = run()  # the warm-up, counted in the peak
        for _ in range(row["repeats"]):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            grads = run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        return grads

    grads, peak, what = peak_memory(runs, device)
    flat = torch.cat([grads[k].detach().flatten().double().cpu() for k in params])
    torch.save(flat, row["grad_file"])
    return {"peak_bytes": peak, "measured": what, "notes": notes,
            "seconds_per_task": sorted(times)[len(times) // 2] / row["tasks"]}


# -- the driver -----------------------------------------------------------------------------


def plan(args) -> list[dict]:
    kinds = args.rows.split(",")
    unknown = sorted(set(kinds) - set(ROW_KINDS))
    if unknown:
        sys.exit(f"--rows: unknown {unknown}; choose from {list(ROW_KINDS)}")
    chunks = [0 if c == "all" else int(c) for c in args.chunks.split(",")]
    rows = []
    for kind in ROW_KINDS:
        if kind not in kinds:
            continue
        if kind.startswith("vmap"):
            rows += [{"kind": kind, "chunk": c,
                      "name": f"vmap, chunk {c or 'all'}" + RECOMPUTED.get(kind[4:], "")}
                     for c in chunks if c <= args.tasks]
        else:
            rows.append({"kind": kind, "name": {
                "torch-checkpoint": "torch.utils.checkpoint", "l2l": "learn2learn"}.get(
                    kind, "loop" + RECOMPUTED.get(kind[4:], ""))})
    return rows


RECOMPUTED = {"-recompute": ", steps recomputed",
              "-recompute-all": ", steps and query blocks recomputed"}


def probe_l2l(python: str) -> str | None:
    out = subprocess.run([python, "-c", "import learn2learn; print(learn2learn.__version__)"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        print(f"learn2learn row left out: {python} cannot import it ({last})", flush=True)
        return None
    return out.stdout.split()[-1]


def machine_line(device: str) -> str:
    """The machine, without metadist.launch (a GPU machine has no Ray or MLflow)."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    except OSError:
        cpu = platform.processor() or "?"
    gpu = f"{torch.cuda.get_device_name(torch.device(device))}; " \
        if device.startswith("cuda") else ""
    return (f"{gpu}{cpu}, {os.cpu_count()} CPUs; {platform.platform()}; torch "
            f"{torch.__version__} (CUDA {torch.version.cuda}, "
            f"{torch.backends.cpu.get_cpu_capability()}); Python {platform.python_version()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="64,160,320,640")
    parser.add_argument("--tasks", type=int, default=4, help="tasks per meta-gradient")
    parser.add_argument("--steps", type=int, default=5, help="inner steps")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--chunks", default="all,1,2", help="vmap chunk sizes (all: every task)")
    parser.add_argument("--rows", default=",".join(ROW_KINDS))
    parser.add_argument("--repeats", type=int, default=1, help="timed runs after the warm-up")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: default")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--inner-lr", type=float, default=0.01)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                        help="float64: to check that the rows' meta-gradients agree")
    parser.add_argument("--l2l-python", default=sys.executable,
                        help="interpreter that can import learn2learn")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=65536,
                        help="glibc's M_MMAP_THRESHOLD in the rows' processes on a CPU; "
                             "0: glibc's default")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"
                                             / "second_order_memory.md"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one row (JSON)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_row(json.loads(args.one))))
        return

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    spec = {"widths": [int(w) for w in args.widths.split(",")], "tasks": args.tasks,
            "steps": args.steps, "device": device, "ways": args.ways, "shots": args.shots,
            "queries": args.queries, "image_size": args.image_size,
            "inner_lr": args.inner_lr, "repeats": args.repeats, "threads": args.threads,
            "dtype": args.dtype}
    rows = plan(args)
    l2l = probe_l2l(args.l2l_python) if any(r["kind"] == "l2l" for r in rows) else None
    if l2l is None:
        rows = [r for r in rows if r["kind"] != "l2l"]
    env = dict(os.environ)
    if device == "cpu" and args.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        reference = None
        for i, row in enumerate(rows):
            row.update(spec, grad_file=str(Path(tmp) / f"grad-{i}.pt"))
            python = args.l2l_python if row["kind"] == "l2l" else sys.executable
            out = subprocess.run([python, __file__, "--one", json.dumps(row)],
                                 capture_output=True, text=True, env=env)
            if out.returncode != 0:
                row["failed"] = (out.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{row['name']:32s} failed: {row['failed']}", flush=True)
                continue
            row.update(json.loads(out.stdout.strip().splitlines()[-1]))
            grad = torch.load(row["grad_file"], weights_only=True)
            if reference is None:
                reference = grad
            row["gradient_error"] = ((grad - reference).norm() / reference.norm()).item()
            print(f"{row['name']:32s} {row['peak_bytes'] / 2**20:9.1f} MiB "
                  f"{row['seconds_per_task']:8.3f} s/task  "
                  f"meta-gradient vs first row {row['gradient_error']:.1e}", flush=True)
    text = render(rows, spec, args, l2l, started, load_before, os.getloadavg())
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


def render(rows: list[dict], spec: dict, args, l2l: str | None, started: datetime,
           load_before, load_after) -> str:
    measured = next((r["measured"] for r in rows if "measured" in r), "?")
    loop = next((r for r in rows if r["kind"] == "loop" and "peak_bytes" in r), None)
    base = loop and loop["peak_bytes"]
    widths = "-".join(map(str, spec["widths"]))
    lines = [
        "# Second-order MAML's memory on ResNet-12",
        "",
        f"`python benchmarks/second_order_memory.py {' '.join(sys.argv[1:])}`, "
        f"{started:%Y-%m-%d %H:%M} UTC.",
        "",
        f"- machine: {machine_line(spec['device'])}; load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after",
        f"- device: {spec['device']}; torch threads: {spec['threads'] or 'default'}",
        f"- ResNet-12 widths {widths}; {spec['tasks']} tasks of {spec['ways']}-way "
        f"{spec['shots']}-shot, {spec['queries']} queries per class, "
        f"{spec['image_size']}x{spec['image_size']}x3; {spec['steps']} inner SGD steps of "
        f"α={spec['inner_lr']}; second order; {spec['dtype']}",
        f"- peak: {measured}, over the process's baseline (torch, model, parameters and "
        "batch loaded), warm-up run included; each row in a fresh process"
        + ("" if spec["device"] != "cpu" else
           f"; glibc mmap threshold {args.malloc_mmap_threshold or 'glibc default'}"),
        f"- time: median of {spec['repeats']} timed run(s) after the warm-up, per task",
        "- learn2learn: " + (f"{l2l} (`MAML(first_order=False)`, clone/adapt per task, "
                             "metadist's initial parameters)" if l2l else
                             f"not importable by {args.l2l_python}: row left out (see the "
                             "script's docstring to build it)"),
        "",
        "| configuration | peak memory (MiB) | vs loop | time per task (s) | vs loop | "
        "meta-gradient vs loop (relative) | notes |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        if "failed" in row:
            lines.append(f"| {row['name']} | failed | | | | | {row['failed'][:120]} |")
            continue
        ratio = f"{row['peak_bytes'] / base:.2f}x" if base else ""
        slower = f"{row['seconds_per_task'] / loop['seconds_per_task']:.2f}x" if loop else ""
        notes = ", ".join(f"{k} {v}" for k, v in row["notes"].items())
        if row["kind"] == "torch-checkpoint":
            per_step = row["notes"]["step runs"] / ((spec["repeats"] + 1) * spec["tasks"]
                                                   * spec["steps"])
            notes = f"{per_step:g} runs of each inner step"
        lines.append(f"| {row['name']} | {row['peak_bytes'] / 2**20:.1f} | {ratio} | "
                     f"{row['seconds_per_task']:.3f} | {slower} | {row['gradient_error']:.1e} | "
                     f"{notes} |")
    lines += ["", "`loop`: one task at a time, every inner step's graph kept; `steps "
              "recomputed`: `train.recompute_inner=true`; `steps and query blocks recomputed`: "
              "and `train.recompute_query=true`; `vmap, chunk C`: C tasks per vmap call "
              "(`train.chunk`), `all`: every task at once. The last numeric column is "
              "|g - g_loop| / |g_loop|: in float32 it holds round-off, which on random "
              "images and small widths is large (a float32 meta-gradient of 8-8-16-16 with "
              "5 steps was 35% off the float64 one, on either path); `--dtype float64` "
              "shows whether the rows compute the same meta-gradient.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
