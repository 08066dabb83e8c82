"""Meta-training throughput on a GPU: loop vs vmap, meta-batch per worker, bf16 autocast.

The questions a lent GPU answers that the CPU benchmarks cannot: does the vectorised
inner loop (torch.func.vmap over the meta-batch) beat the per-task loop there, how far
does a larger meta-batch per worker fill the card, and does bf16 autocast help, at what
cost in meta-gradient error. One process, no Ray or MLflow (the GPU machine has neither):

    python benchmarks/gpu_throughput.py [--device cuda] [--settings omniglot,miniimagenet]
        [--algorithms maml,fomaml,reptile] [--paths loop,vmap:0] [--precisions fp32,bf16]
        [--steps 5] [--max-seconds 360] [--out benchmarks/results/gpu_throughput.md]

Settings are the configs' (Omniglot 5-way 1-shot: Conv4-64 stride-2 on 28x28, 1 inner
step of α=0.4, meta-batch 32; miniImageNet 5-way 1-shot: Conv4-32 max-pool on 84x84,
flatten readout, 5 inner steps of α=0.01, meta-batch 4), 15 queries per class, each also
at 4x the config's meta-batch. Each row: median time of a meta-training step (meta-gradient
and Adam) over --steps after two warm-up steps, tasks/s, achieved TFLOP/s (FLOPs counted
once per setting and algorithm on the loop path) against a matmul ceiling measured in the
same run, peak memory, the GPU's utilisation (NVML samples during the timed steps), and
the meta-gradient's relative error against the loop in float64 on the same batch. Inputs are
random tensors of the episodes' shape: throughput does not depend on pixel values. A row
that fails (out of memory, an op autocast cannot take) is recorded as such; rows are
skipped once --max-seconds have passed, so the run fits a device lease.

`benchmarks/gpu_run.sh` is the whole device check: it installs what the GPU machine lacks
and runs this script and a short real-data training run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Setting:
    title: str
    config: str
    image_shape: tuple[int, int, int]


SETTINGS = {
    "omniglot": Setting("Omniglot 5-way 1-shot", "configs/omniglot_5w1s_maml.yaml", (1, 28, 28)),
    "miniimagenet": Setting("miniImageNet 5-way 1-shot", "configs/miniimagenet_5w1s_maml.yaml",
                            (3, 84, 84)),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int = 8192) -> float:
    """FLOP/s of an n x n matmul in ``dtype`` (median of 10 after a warm-up)."""
    if device.type == "cpu":  # a smoke test: bf16 matmuls are emulated on most CPUs
        n = 512
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    times = []
    for _ in range(10):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / sorted(times)[len(times) // 2]


class Utilisation:
    """The GPU's utilisation (NVML, through torch.cuda.utilization) sampled every 50 ms
    while the block runs; None where NVML is not available."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.samples = device, []
        self._stop = threading.Event()
        self.available = device.type == "cuda" and _nvml_works(device)

    def __enter__(self) -> Utilisation:
        if self.available:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.available:
            self._stop.set()
            self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append(torch.cuda.utilization(self.device))

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def _nvml_works(device: torch.device) -> bool:
    try:
        torch.cuda.utilization(device)
        return True
    except Exception:  # no pynvml, or NVML refused (e.g. in a sandbox)
        return False


def random_batch(setting: Setting, cfg, meta_batch: int, device: torch.device):
    from inner_loop_throughput import random_meta_batch

    batch = random_meta_batch(cfg.data, setting.image_shape, meta_batch, seed=meta_batch)
    return type(batch)(*(t.to(device) for t in batch))


def build(setting: Setting, cfg, algorithm: str, device: torch.device):
    from metadist.algorithms import MetaStep
    from metadist.models import build_model

    model = build_model(cfg.model, ways=cfg.data.ways, in_channels=setting.image_shape[0],
                        image_size=setting.image_shape[-1])
    init = model.init_params(torch.Generator().manual_seed(0))
    params = {k: v.to(device).requires_grad_() for k, v in init.items()}
    # The config's inner loop for every algorithm, so the rows compare the same work.
    alg = cfg.algorithm
    return model, params, MetaStep(algorithm, inner_lr=alg.inner_lr, inner_steps=alg.inner_steps)


def meta_gradient_of(model, params, batch, step, path: str, precision: str,
                     device: torch.device) -> dict[str, torch.Tensor]:
    from metadist.algorithms import meta_gradient

    inner_loop, _, chunk = path.partition(":")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    with autocast:
        grads, _ = meta_gradient(model, params, batch, step, inner_loop=inner_loop,
                                 chunk=int(chunk or 0))
    return grads


def fp64_reference(setting, cfg, algorithm, meta_batch, device) -> dict[str, torch.Tensor]:
    """The loop's meta-gradient in float64: the fp32 loop's own round-off (which five
    second-order inner steps amplify to ~5e-4 on miniImageNet) shows in its row instead
    of hiding in the reference."""
    model, params, step = build(setting, cfg, algorithm, device)
    params = {k: v.detach().double().requires_grad_() for k, v in params.items()}
    batch = random_batch(setting, cfg, meta_batch, device)
    batch = type(batch)(*(t.double() if t.is_floating_point() else t for t in batch))
    return meta_gradient_of(model, params, batch, step, "loop", "fp32", device)


def relative_error(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    diff = torch.cat([(grads[k].double() - reference[k]).flatten() for k in reference])
    ref = torch.cat([reference[k].flatten() for k in reference])
    return (diff.norm() / ref.norm()).item()


def count_flops_per_task(setting, cfg, algorithm, device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model, params, step = build(setting, cfg, algorithm, device)
    tasks = min(cfg.algorithm.meta_batch_size, 4)
    batch = random_batch(setting, cfg, tasks, device)
    counter = FlopCounterMode(display=False)
    with counter:
        meta_gradient_of(model, params, batch, step, "loop", "fp32", device)
    return counter.get_total_flops() / tasks


def run_row(setting, cfg, algorithm, meta_batch, path, precision, steps, device,
            reference) -> dict:
    model, params, step = build(setting, cfg, algorithm, device)
    batch = random_batch(setting, cfg, meta_batch, device)
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)

    def apply(grads) -> None:
        for k, p in params.items():
            p.grad = grads[k].float() / meta_batch
        optimizer.step()

    def one_step() -> None:
        apply(meta_gradient_of(model, params, batch, step, path, precision, device))

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    first = meta_gradient_of(model, params, batch, step, path, precision, device)
    error = relative_error(first, reference)  # same initial parameters, same batch
    apply(first)
    one_step()  # the second warm-up step
    times = []
    with Utilisation(device) as utilisation:
        for _ in range(steps):
            synchronize(device)
            t0 = time.perf_counter()
            one_step()
            synchronize(device)
            times.append(time.perf_counter() - t0)
    seconds = sorted(times)[len(times) // 2]
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"seconds_per_step": seconds, "tasks_per_s": meta_batch / seconds,
            "peak_mb": peak / 2**20, "utilisation": utilisation.mean, "grad_error": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--settings", default="omniglot,miniimagenet")
    parser.add_argument("--algorithms", default="maml,fomaml,reptile")
    parser.add_argument("--paths", default="loop,vmap:0")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--batch-factors", default="1,4",
                        help="meta-batches as multiples of the config's")
    parser.add_argument("--meta-batches", default=None,
                        help="explicit meta-batch sizes instead of --batch-factors")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--max-seconds", type=float, default=360.0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"
                                             / "gpu_throughput.md"))
    args = parser.parse_args()
    from metadist.config import load_config

    device = torch.device(args.device)
    started = time.perf_counter()

    def out_of_time() -> bool:
        return time.perf_counter() - started > args.max_seconds

    ceilings = {"fp32": matmul_ceiling(device, torch.float32),
                "bf16": matmul_ceiling(device, torch.bfloat16)}
    sections = []
    for name in args.settings.split(","):
        setting = SETTINGS[name]
        cfg = load_config(ROOT / setting.config)
        rows = []
        for algorithm in args.algorithms.split(","):
            per_task = count_flops_per_task(setting, cfg, algorithm, device)
            base = cfg.algorithm.meta_batch_size
            sizes = ([int(m) for m in args.meta_batches.split(",")] if args.meta_batches else
                     [base * int(f) for f in args.batch_factors.split(",")])
            for meta_batch in sizes:
                # No reference for rows that will be skipped anyway.
                reference = None if out_of_time() else fp64_reference(
                    setting, cfg, algorithm, meta_batch, device)
                for path in args.paths.split(","):
                    for precision in args.precisions.split(","):
                        row = {"algorithm": algorithm, "meta_batch": meta_batch, "path": path,
                               "precision": precision, "flops": per_task * meta_batch}
                        if out_of_time():
                            row["error"] = f"skipped: past --max-seconds {args.max_seconds:.0f}"
                        else:
                            try:
                                row.update(run_row(setting, cfg, algorithm, meta_batch, path,
                                                   precision, args.steps, device, reference))
                            except Exception as exc:  # OOM, an op autocast cannot take...
                                row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                        rows.append(row)
                        print(name, render_row(row, ceilings, {}), flush=True)
                del reference
        sections.append((setting, cfg, rows))
    text = render(sections, ceilings, device, args, time.perf_counter() - started)
    print(text)
    Path(args.out).write_text(text)


def render_row(r: dict, ceilings: dict, loop_rates: dict) -> str:
    head = f"| {r['algorithm']} | {r['meta_batch']} | {r['path']} | {r['precision']} |"
    if "error" in r:
        return head + f" {r['error']} | | | | | | | |"
    base = loop_rates.get((r["algorithm"], r["meta_batch"]))
    ratio = f"{r['tasks_per_s'] / base:.2f}x" if base else "—"
    rate = r["flops"] / r["seconds_per_step"]
    util = "n/a" if r["utilisation"] is None else f"{r['utilisation']:.0f}%"
    return head + (
        f" {1000 * r['seconds_per_step']:.3g} | {r['tasks_per_s']:.3g} | {ratio} "
        f"| {rate / 1e12:.3g} | {100 * rate / ceilings[r['precision']]:.3g}% "
        f"| {r['peak_mb']:.0f} | {util} | {r['grad_error']:.1e} |")


def render(sections, ceilings, device, args, seconds) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        stack = f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    else:
        name, stack = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)", "CPU"
    smi = ""
    with contextlib.suppress(Exception):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
    lines = [
        "# Meta-training throughput on a GPU: loop vs vmap, meta-batch, bf16 autocast",
        "",
        f"Device: {name}{f' (driver, max SM clock: {smi})' if smi else ''}; torch "
        f"{torch.__version__}, {stack}, Python {platform.python_version()}. "
        f"cuDNN TF32 for convolutions: {torch.backends.cudnn.allow_tf32}; float32 matmul "
        f"precision: {torch.get_float32_matmul_precision()} (PyTorch's defaults unless "
        "changed). "
        f"Ceilings, same run: float32 matmul {ceilings['fp32'] / 1e12:.3g} TFLOP/s, bf16 "
        f"matmul {ceilings['bf16'] / 1e12:.3g} TFLOP/s. Whole run {seconds / 60:.1f} min.",
        "",
        f"Median of {args.steps} meta-training steps (meta-gradient and Adam) after two "
        "warm-up steps, random inputs of the episodes' shape. `vs loop`: tasks/s against "
        "the fp32 loop at the same meta-batch. TFLOP/s: the loop path's FLOPs per task "
        "(torch's FlopCounterMode) times tasks/s; % of the matmul ceiling of the row's "
        "precision. Peak: torch's peak allocated memory for the row. GPU: NVML utilisation "
        "(share of time a kernel ran) sampled every 50 ms over the timed steps. Grad error: "
        "‖g − g_ref‖/‖g_ref‖ of the meta-gradient on the same batch and initial parameters, "
        "g_ref from the loop in float64 (so the fp32 loop's row shows its own round-off).",
    ]
    for setting, cfg, rows in sections:
        loop_rates = {(r["algorithm"], r["meta_batch"]): r["tasks_per_s"] for r in rows
                      if r["path"] == "loop" and r["precision"] == "fp32" and "error" not in r}
        size = setting.image_shape[-1]
        lines += [
            "",
            f"## {setting.title}",
            "",
            f"{setting.config}: Conv4-{cfg.model.hidden} ({cfg.model.pool}) on "
            f"{size}x{size}x{setting.image_shape[0]}, {cfg.model.readout} readout, "
            f"{cfg.data.ways}-way {cfg.data.shots}-shot, {cfg.data.queries} queries/class, "
            f"{cfg.algorithm.inner_steps} inner step(s) of α={cfg.algorithm.inner_lr} for "
            "every algorithm.",
            "",
            "| algorithm | meta-batch | path | precision | ms/step | tasks/s | vs loop "
            "| TFLOP/s | % of ceiling | peak MB | GPU | grad error |",
            "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [render_row(r, ceilings, loop_rates) for r in rows]
    lines += ["", "Paths: `loop` = one task after another; `vmap:C` = torch.func.vmap over "
              "chunks of C tasks (0 = the whole meta-batch at once). A row that failed or "
              "did not fit the time says so in place of its numbers.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
