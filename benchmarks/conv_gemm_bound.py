"""How fast can a vectorised inner loop be on this CPU? An upper bound from the conv shapes.

After the first inner step every task of a meta-batch has its own weights, so a vectorised
path must compute each of the Conv4's convolutions with per-task weights: as a grouped
convolution (what ``vmap`` makes of ``F.conv2d``) or as one batched matrix product over
tasks of the im2col matrices (metadist's ``matmul`` layers). This script times, in one
run and per layer of the Omniglot and miniImageNet Conv4s, forward plus backward of:

- ``native/task``: ``F.conv2d`` on one task's images with shared weights (what the
  per-task loop does, one task at a time);
- ``native/all``: ``F.conv2d`` on every task's images at once with shared weights (only
  possible before the first inner step; shown as the best case of the conv kernel);
- ``grouped``: the per-task-weight convolution as one grouped ``F.conv2d`` (vmap's lowering);
- ``bmm``: the per-task-weight im2col product alone, ``torch.bmm`` over tasks, *not*
  counting the cost of building the im2col matrices (so it is an upper bound on any
  GEMM-based vectorised path).

Each is reported in GFLOP per second (2·MACs, forward plus the two backward products,
3x the forward) beside this run's float32 4096x4096 matmul ceiling. The whole
second-order MAML meta-gradient of the per-task loop and of metadist's vmap path (chunks
of ``--chunk`` tasks) is timed in the same run, on random inputs of the setting's shapes,
its FLOPs counted by ``torch.utils.flop_counter``. Nearly all of the step's FLOPs are
these convolutions (forward, backward, and their second-order terms) and the rest
(batch norm, ReLU, pooling) is memory-bound, so a vectorised path can at most run the
step at its convolutions' per-task-weight rate: ``bmm rate / loop's step rate`` bounds
what vectorising over tasks can gain here.

Usage: ``python benchmarks/conv_gemm_bound.py [--threads 1 2] [--out results/conv_gemm_bound.md]``
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Layer:
    setting: str
    index: int
    side: int  # input height = width
    c_in: int
    c_out: int
    stride: int
    images: int  # images per task (support + query)
    tasks: int

    @property
    def out_side(self) -> int:
        return (self.side - 1) // self.stride + 1

    def flops(self, tasks: int) -> float:
        macs = self.images * self.out_side**2 * self.c_out * 9 * self.c_in
        return 3 * 2 * macs * tasks  # forward + grad input + grad weight


def conv4_layers(setting: str, side: int, c_in: int, hidden: int, pool: str, images: int,
                 tasks: int) -> list[Layer]:
    layers = []
    for i in range(4):
        stride = 2 if pool == "stride" else 1
        layers.append(Layer(setting, i, side, c_in if i == 0 else hidden, hidden, stride,
                            images, tasks))
        side = (side - 1) // 2 + 1 if pool == "stride" else side // 2
    return layers


def timed(fn, min_seconds: float = 0.5) -> float:
    """Median seconds of ``fn`` over enough repeats to fill ``min_seconds``, after a warm-up."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-6)
    times = []
    for _ in range(max(3, int(min_seconds / once))):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def fwd_bwd(op, *inputs):
    def run():
        for t in inputs:
            t.grad = None
        op(*inputs).sum().backward()

    return run


def measure(layer: Layer) -> dict[str, float]:
    n, s, ci, co = layer.images, layer.side, layer.c_in, layer.c_out
    st, tk = layer.stride, layer.tasks
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_()

    x_task, w = rnd(n, ci, s, s), rnd(co, ci, 3, 3)
    x_all = rnd(tk * n, ci, s, s)
    # Grouped: tasks folded into channels, one weight set per group.
    x_grouped, w_grouped = rnd(n, tk * ci, s, s), rnd(tk * co, ci, 3, 3)
    rows, k = n * layer.out_side**2, 9 * ci
    cols, w_mats = rnd(tk, rows, k), rnd(tk, k, co)

    ops = {
        "native/task": (fwd_bwd(lambda x, w: F.conv2d(x, w, stride=st, padding=1), x_task, w), 1),
        "native/all": (fwd_bwd(lambda x, w: F.conv2d(x, w, stride=st, padding=1), x_all, w), tk),
        "grouped": (fwd_bwd(lambda x, w: F.conv2d(x, w, stride=st, padding=1, groups=tk),
                            x_grouped, w_grouped), tk),
        "bmm": (fwd_bwd(torch.bmm, cols, w_mats), tk),
    }
    return {name: layer.flops(tasks) / timed(fn) for name, (fn, tasks) in ops.items()}


def maml_step_rates(layers: list[Layer], ways: int, shots: int, inner_lr: float,
                    inner_steps: int, readout: str, chunk: int) -> dict[str, float]:
    """GFLOP/s of the whole second-order MAML meta-gradient, per-task loop and vmap."""
    from torch.utils.flop_counter import FlopCounterMode

    from metadist.algorithms import MetaStep, meta_gradient
    from metadist.data.episodes import MetaBatch
    from metadist.models import Conv4

    first = layers[0]
    tasks, side, c_in = first.tasks, first.side, first.c_in
    queries = first.images // ways - shots
    gen = torch.Generator().manual_seed(0)
    batch = MetaBatch(
        torch.randn(tasks, ways * shots, c_in, side, side, generator=gen),
        torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous(),
        torch.randn(tasks, ways * queries, c_in, side, side, generator=gen),
        torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous(),
    )
    model = Conv4(ways=ways, in_channels=c_in, hidden=first.c_out, image_size=side,
                  pool="max", readout=readout)
    params = {k: v.requires_grad_() for k, v in model.init_params().items()}
    step = MetaStep("maml", inner_lr=inner_lr, inner_steps=inner_steps)
    counter = FlopCounterMode(display=False)
    with counter:
        meta_gradient(model, params, batch, step, inner_loop="loop")
    flops = counter.get_total_flops()
    return {
        path: flops / timed(lambda path=path: meta_gradient(model, params, batch, step,
                                                            inner_loop=path, chunk=chunk),
                            min_seconds=3.0)
        for path in ("loop", "vmap")
    }


def matmul_ceiling(n: int = 4096) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / timed(lambda: a @ b, min_seconds=2.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--chunk", type=int, default=4, help="tasks per vmap call")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    settings = [
        # Omniglot 5-way 1-shot, 15 queries: 5 + 75 images per task, meta-batch 32.
        (conv4_layers("Omniglot 5w1s, Conv4-64 max-pool, 28x28x1", 28, 1, 64, "max", 80, 32),
         dict(ways=5, shots=1, inner_lr=0.4, inner_steps=1, readout="mean")),
        # miniImageNet 5-way 1-shot: 80 images per task, meta-batch 4, 5 inner steps.
        (conv4_layers("miniImageNet 5w1s, Conv4-32 max-pool, 84x84x3", 84, 3, 32, "max", 80, 4),
         dict(ways=5, shots=1, inner_lr=0.01, inner_steps=5, readout="flatten")),
    ]
    load_before = os.getloadavg()
    lines = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        ceiling = matmul_ceiling()
        lines.append(f"\n### {threads} thread{'s' if threads > 1 else ''}: matmul ceiling "
                     f"{ceiling / 1e9:.0f} GFLOP/s\n")
        for layers, algorithm in settings:
            lines.append(f"\n{layers[0].setting}, meta-batch {layers[0].tasks}, "
                         f"{layers[0].images} images per task\n")
            lines.append("| layer | input | native/task | native/all | grouped | bmm (GEMM only) |")
            lines.append("|---|---|---:|---:|---:|---:|")
            total_flops, total_time = 0.0, {}
            for layer in layers:
                rates = measure(layer)
                cells = " | ".join(
                    f"{r / 1e9:.0f} ({100 * r / ceiling:.0f}%)" for r in rates.values()
                )
                lines.append(f"| conv{layer.index} | {layer.side}x{layer.side}x{layer.c_in} "
                             f"| {cells} |")
                f = layer.flops(1)
                total_flops += f
                for name, r in rates.items():
                    total_time[name] = total_time.get(name, 0.0) + f / r
            whole = {name: total_flops / t for name, t in total_time.items()}
            cells = " | ".join(f"**{r / 1e9:.0f} ({100 * r / ceiling:.0f}%)**"
                               for r in whole.values())
            lines.append(f"| all four | | {cells} |")
            step = maml_step_rates(layers, chunk=args.chunk, **algorithm)
            loop = step["loop"]
            lines.append(
                f"\nWhole second-order MAML meta-gradient, same run: per-task loop "
                f"{loop / 1e9:.0f} GFLOP/s ({100 * loop / ceiling:.0f}% of the ceiling), vmap "
                f"over chunks of {args.chunk} tasks {step['vmap'] / 1e9:.0f} GFLOP/s "
                f"(**{step['vmap'] / loop:.2f}x** the loop). Most a vectorised path could gain "
                f"if every FLOP of the step ran at its convolutions' per-task-weight rate: "
                f"bmm (GEMM only) **{whole['bmm'] / loop:.2f}x**, grouped convolution "
                f"**{whole['grouped'] / loop:.2f}x**; the 2x goal needs 2.00x."
            )
    header = (
        "# Per-task-weight convolutions: an upper bound on a vectorised inner loop\n\n"
        f"Machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, Python {platform.python_version()}; load average before "
        f"{'/'.join(f'{x:.1f}' for x in load_before)}, after "
        f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())}.\n\n"
        "GFLOP/s of forward + backward (3x the forward FLOPs) per conv layer, median of "
        "repeats, with the share of the same run's matmul ceiling. Produced by "
        "`benchmarks/conv_gemm_bound.py`."
    )
    text = header + "\n" + "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
