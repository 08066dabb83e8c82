"""metadist's prototypical network against a plain-PyTorch reference on the same
miniImageNet training episodes: does ours train as the published implementations do?

The reference follows the public PyTorch re-implementation that reproduces Snell et al.'s
miniImageNet numbers (cyvius96/prototypical-network-pytorch: 49.1% 1-shot): four blocks
of ``nn.Conv2d`` (with bias, PyTorch's default initialisation), ``nn.BatchNorm2d`` in
training mode, ReLU and 2x2 max-pool; the support and the query images go through the
network in two calls (each its own batch statistics), logits are negative squared
Euclidean distances to the class means, Adam at 0.001. Ours is ``metadist``'s functional
Conv4 (no conv bias, Xavier initialisation, flattened 1,600 features) and its
``meta_gradient`` with ``algorithm=protonet``, stepped by the same Adam.

Both see episodes 0, 1, 2, ... of one ``EpisodeSampler`` (``--seed``) of the training
split, one episode a step, in one process each, one thread; the table gives each
window's mean query loss and accuracy (training episodes, before the step's update).

    python benchmarks/protonet_reference.py --impl reference --ways 30 --steps 80
    python benchmarks/protonet_reference.py --impl metadist --ways 30 --steps 80
    python benchmarks/protonet_reference.py --table   # both logs -> the Markdown table

Results: JSON lines in benchmarks/results/protonet_reference.jsonl (one per window and
implementation, the last run of each replacing its earlier lines) and the table in
benchmarks/results/protonet_reference.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from metadist.algorithms.meta import MetaStep, meta_gradient
from metadist.data.episodes import EpisodeSampler, stack_episodes
from metadist.data.store import ClassStore
from metadist.models.conv4 import Conv4

RESULTS = Path(__file__).parent / "results"
LOG = RESULTS / "protonet_reference.jsonl"


def reference_step(ways: int):
    def block(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout),
                             nn.ReLU(), nn.MaxPool2d(2))

    net = nn.Sequential(block(3, 64), block(64, 64), block(64, 64), block(64, 64),
                        nn.Flatten())
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def step(ep) -> tuple[float, float]:
        support, query = net(ep.support_x), net(ep.query_x)
        protos = support.view(ways, -1, support.shape[-1]).mean(1)  # labels are 0..N-1
        logits = -torch.cdist(query, protos).pow(2)
        loss = F.cross_entropy(logits, ep.query_y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item(), (logits.argmax(-1) == ep.query_y).float().mean().item()

    return step


def metadist_step(ways: int, image_size: int):
    model = Conv4(ways=ways, in_channels=3, hidden=64, image_size=image_size, pool="max",
                  readout="flatten")
    params = {k: v.requires_grad_() for k, v in
              model.init_params(torch.Generator().manual_seed(0)).items()}
    opt = torch.optim.Adam(params.values(), lr=1e-3)
    meta = MetaStep(algorithm="protonet")

    def step(ep) -> tuple[float, float]:
        grads, sums = meta_gradient(model, params, stack_episodes([ep]), meta)
        for k, v in params.items():
            v.grad = grads[k]
        opt.step()
        return sums["loss"], sums["accuracy"]

    return step


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    store = ClassStore(Path(args.dataset) / "train", verify=False)
    sampler = EpisodeSampler(store, ways=args.ways, shots=args.shots, queries=args.queries,
                             seed=args.seed)
    step = (reference_step(args.ways) if args.impl == "reference"
            else metadist_step(args.ways, store.image_size))
    lines = [json.loads(line) for line in LOG.read_text().splitlines()] if LOG.exists() else []
    lines = [x for x in lines if (x["impl"], x["ways"], x["shots"]) !=
             (args.impl, args.ways, args.shots)]
    t0, window = time.perf_counter(), []
    for i in range(args.steps):
        window.append(step(sampler.episode(i)))
        if len(window) == args.window:
            loss, acc = (sum(v) / len(v) for v in zip(*window))
            row = {"impl": args.impl, "ways": args.ways, "shots": args.shots,
                   "steps": f"{i + 2 - args.window}-{i + 1}", "loss": loss, "accuracy": acc,
                   "seconds": time.perf_counter() - t0}
            print(json.dumps(row), flush=True)
            lines.append(row)
            window = []
    RESULTS.mkdir(exist_ok=True)
    LOG.write_text("".join(json.dumps(x) + "\n" for x in lines))


def table() -> str:
    lines = [json.loads(line) for line in LOG.read_text().splitlines()]
    out = ["| episodes | setting | reference loss | reference accuracy | metadist loss | "
           "metadist accuracy |", "|---|---|---:|---:|---:|---:|"]
    keys = sorted({(x["ways"], x["shots"], x["steps"]) for x in lines},
                  key=lambda k: (k[0], k[1], int(k[2].split("-")[0])))
    for ways, shots, steps in keys:
        cell = {x["impl"]: x for x in lines
                if (x["ways"], x["shots"], x["steps"]) == (ways, shots, steps)}
        values = []
        for impl in ("reference", "metadist"):
            x = cell.get(impl)
            values += ["—", "—"] if x is None else [f"{x['loss']:.1f}",
                                                   f"{100 * x['accuracy']:.1f}%"]
        out.append(f"| {steps} | {ways}-way {shots}-shot | " + " | ".join(values) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=("reference", "metadist"))
    parser.add_argument("--dataset", default="data/miniimagenet")
    parser.add_argument("--ways", type=int, default=30)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if not args.table:
        if args.impl is None:
            parser.error("--impl reference or --impl metadist (or --table)")
        run(args)
    print(table())


if __name__ == "__main__":
    main()
