"""How far bf16 (and fp16) autocast moves the meta-gradient, at initialisation and trained.

`gpu_throughput.py` reports each row's meta-gradient error on random inputs at the
initial parameters, which is where it can run without data. This asks whether that figure
is the one that matters for training: the same error on real episodes, at the initial
parameters and at trained ones (a checkpoint), for each algorithm, under float32, fp16 and
bf16 autocast. It runs on any device (CPU autocast emulates bf16 slowly: keep the batches
few there); accuracy, not speed, is measured, so a CPU run answers it.

    python benchmarks/mixed_precision_error.py --checkpoint RUN/checkpoints/final.pt
        [--setting omniglot|miniimagenet] [--dataset data/omniglot-1200-423]
        [--algorithms maml,fomaml,reptile] [--batches 4] [--tasks 4] [--device cpu]

Every error is ‖g − g_ref‖/‖g_ref‖ for one meta-batch, g_ref the loop's meta-gradient in
float64 from the same parameters and batch; the table gives the median and the largest
over --batches meta-batches of --tasks training-split episodes (seeded), and the median
cosine between g and g_ref. Beside them, as a yardstick, the same measures between the
float64 meta-gradients of consecutive meta-batches: the noise of sampling tasks, which
every outer step carries whatever the precision. The model and inner loop are the setting's config
(gpu_throughput.py's), for every algorithm.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_throughput import SETTINGS, build, random_batch  # noqa: E402

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
# The yardstick: how far the next meta-batch's exact (float64) meta-gradient lies from this
# one's, i.e. the noise that sampling tasks puts into every outer step anyway.
SAMPLING = "fp64, next meta-batch"


def real_batches(dataset: str, cfg, count: int, tasks: int) -> list:
    from metadist.data.episodes import EpisodeSampler, stack_episodes
    from metadist.data.store import ClassStore

    sampler = EpisodeSampler(ClassStore(f"{dataset}/train"), ways=cfg.data.ways,
                             shots=cfg.data.shots, queries=cfg.data.queries, seed=7)
    return [stack_episodes([sampler.episode(b * tasks + t) for t in range(tasks)])
            for b in range(count)]


def meta_gradient_in(model, params, batch, step, dtype, device):
    from metadist.algorithms import meta_gradient

    batch = type(batch)(*(t.to(device) for t in batch))
    if dtype is torch.float64:
        params = {k: v.detach().double().requires_grad_() for k, v in params.items()}
        batch = type(batch)(*(t.double() if t.is_floating_point() else t for t in batch))
    autocast = (torch.autocast(device.type, dtype=dtype)
                if dtype in (torch.float16, torch.bfloat16) else contextlib.nullcontext())
    with autocast:
        grads, _ = meta_gradient(model, params, batch, step, inner_loop="loop")
    return torch.cat([grads[k].double().flatten() for k in sorted(grads)])


def errors(model, params, batches, step, device) -> dict[str, tuple[list, list]]:
    out = {name: ([], []) for name in [*PRECISIONS, SAMPLING]}

    def compare(name, g, ref) -> None:
        out[name][0].append(((g - ref).norm() / ref.norm()).item())
        out[name][1].append(torch.nn.functional.cosine_similarity(g, ref, dim=0).item())

    refs = []
    for batch in batches:
        refs.append(ref := meta_gradient_in(model, params, batch, step, torch.float64, device))
        for name, dtype in PRECISIONS.items():
            compare(name, meta_gradient_in(model, params, batch, step, dtype or torch.float32,
                                           device), ref)
    for other, ref in zip(refs[1:], refs[:-1]):
        compare(SAMPLING, other, ref)
    return {name: v for name, v in out.items() if v[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default="omniglot", choices=sorted(SETTINGS))
    parser.add_argument("--dataset", default="data/omniglot-1200-423")
    parser.add_argument("--checkpoint", default=None,
                        help="a checkpoint of the setting's model: adds the trained rows")
    parser.add_argument("--algorithms", default="maml,fomaml,reptile")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from metadist.config import load_config

    torch.manual_seed(0)
    device = torch.device(args.device)
    setting = SETTINGS[args.setting]
    cfg = load_config(ROOT / setting.config)
    started = time.perf_counter()
    real = real_batches(args.dataset, cfg, args.batches, args.tasks)
    conditions = [("random inputs", "initial", [random_batch(setting, cfg, args.tasks, device)
                                                 for _ in range(1)]),
                  ("real episodes", "initial", real)]
    trained = None
    if args.checkpoint:
        trained = torch.load(args.checkpoint, map_location="cpu", weights_only=False)["params"]
        conditions.append(("real episodes", "trained", real))

    rows = []
    for algorithm in args.algorithms.split(","):
        for inputs, point, batches in conditions:
            model, params, step = build(setting, cfg, algorithm, device)
            if point == "trained":
                params = {k: trained[k].float().to(device).requires_grad_() for k in params}
            for name, (errs, cosines) in errors(model, params, batches, step, device).items():
                rows.append((algorithm, inputs, point, name, len(errs), statistics.median(errs),
                             max(errs), statistics.median(cosines)))
            print(f"{algorithm} {inputs} {point} done", file=sys.stderr, flush=True)

    threads = torch.get_num_threads()
    print(f"# Meta-gradient error under autocast: {setting.title}\n")
    print(f"Command: `python benchmarks/mixed_precision_error.py {' '.join(sys.argv[1:])}`. "
          f"Machine: {platform.machine()}, {args.device} ({threads} torch threads); torch "
          f"{torch.__version__}, Python {platform.python_version()}. Whole run "
          f"{(time.perf_counter() - started) / 60:.1f} min.\n")
    print(f"{setting.config}: the model and inner loop for every algorithm; {cfg.data.ways}-way "
          f"{cfg.data.shots}-shot, {cfg.data.queries} queries/class, {args.tasks} tasks per "
          f"meta-batch; real episodes from `{args.dataset}/train` (seed 7); trained parameters "
          f"from `{args.checkpoint}`. Error: ‖g − g_ref‖/‖g_ref‖ against the float64 loop on "
          "the same parameters and batch (random inputs: one batch); `fp64, next meta-batch`: "
          "the float64 meta-gradient of the next meta-batch against this one's.\n")
    print("| algorithm | inputs | parameters | precision | batches | median error | "
          "max error | median cosine |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for algorithm, inputs, point, name, n, med, worst, cos in rows:
        print(f"| {algorithm} | {inputs} | {point} | {name} | {n} | {med:.2e} | {worst:.2e} "
              f"| {cos:.5f} |")


if __name__ == "__main__":
    main()
