"""What a pre-trained backbone's few-shot score depends on at test time: the metric of
the prototype head (squared Euclidean, as metadist's ``protonet``, or cosine, as
Chen et al.'s Classifier-Baseline) and the batch-norm statistics (each episode's own,
support and queries apart as metadist evaluates, or together; or fixed statistics
averaged over training batches, standing in for running averages).

    python benchmarks/pretrained_heads.py runs/NAME/checkpoints/final.pt 300

Episodes: 5-way 1-shot, 15 queries per class, from the test split of data/miniimagenet
(seed 2017, the meta-test's); the fixed statistics come from 4 batches of 128 training
images (64 classes x 2). Prints each variant's accuracy with its 95% CI; results in
benchmarks/results/pretrained_heads.md. A diagnostic: it swaps
``metadist.models.layers.batch_norm`` for the fixed-statistics variants.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F

import metadist.models.conv4 as conv4
from metadist.data.episodes import EpisodeSampler
from metadist.data.store import ClassStore
from metadist.models import layers
from metadist.training.checkpoint import load_trained

DATA = "data/miniimagenet"
VARIANTS = ("trans_sep_euc", "trans_sep_cos", "trans_joint_euc", "running_euc", "running_cos")


class Norms:
    """Batch norm that uses the batch's statistics, records them, or applies fixed ones."""

    def __init__(self) -> None:
        self.mode, self.recorded, self.fixed, self.i = "batch", [], [], 0
        self.batch_norm = layers.batch_norm

    def __call__(self, x, w, b, impl):
        if self.mode == "record":
            xx = x.to(w.dtype)
            self.recorded.append((xx.mean((0, 2, 3)), xx.var((0, 2, 3), unbiased=False)))
        if self.mode == "running":
            m, v = self.fixed[self.i % len(self.fixed)]
            self.i += 1
            x = x.to(w.dtype)
            return ((x - m[:, None, None]) * torch.rsqrt(v[:, None, None] + 1e-5)
                    * w[:, None, None] + b[:, None, None])
        return self.batch_norm(x, w, b, impl)

    def average(self, blocks: int) -> None:
        r = self.recorded
        self.fixed = [(torch.stack([r[j][0] for j in range(b, len(r), blocks)]).mean(0),
                       torch.stack([r[j][1] for j in range(b, len(r), blocks)]).mean(0))
                      for b in range(blocks)]


def score(s, q, y_s, y_q, metric: str) -> float:
    protos = torch.stack([s[y_s == c].mean(0) for c in range(5)])
    if metric == "cos":
        logits = F.normalize(q, dim=-1) @ F.normalize(protos, dim=-1).t()
    else:
        logits = -torch.cdist(q, protos).pow(2)
    return (logits.argmax(-1) == y_q).float().mean().item()


def main() -> None:
    checkpoint, episodes = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    trained = load_trained(checkpoint)
    model, params = trained.model, dict(trained.params)
    norms = Norms()
    layers.batch_norm = conv4.layers.batch_norm = norms
    train = EpisodeSampler(ClassStore(f"{DATA}/train", verify=False), ways=64, shots=2,
                           queries=0, seed=5)
    norms.mode = "record"
    with torch.no_grad():
        for i in range(4):
            model.features(params, train.episode(i).support_x)
    norms.average(model.blocks)
    test = EpisodeSampler(ClassStore(f"{DATA}/test", verify=False), ways=5, shots=1,
                          queries=15, seed=2017)
    res = {k: [] for k in VARIANTS}
    with torch.no_grad():
        for e in range(episodes):
            ep = test.episode(e)
            args = (ep.support_y, ep.query_y)
            norms.mode = "batch"
            s, q = model.features(params, ep.support_x), model.features(params, ep.query_x)
            res["trans_sep_euc"].append(score(s, q, *args, "euc"))
            res["trans_sep_cos"].append(score(s, q, *args, "cos"))
            z = model.features(params, torch.cat([ep.support_x, ep.query_x]))
            n = len(ep.support_x)
            res["trans_joint_euc"].append(score(z[:n], z[n:], *args, "euc"))
            norms.mode, norms.i = "running", 0
            s, q = model.features(params, ep.support_x), model.features(params, ep.query_x)
            res["running_euc"].append(score(s, q, *args, "euc"))
            res["running_cos"].append(score(s, q, *args, "cos"))
    for k, v in res.items():
        v = np.array(v)
        print(f"{k:18s} {100 * v.mean():.2f} ± {196 * v.std() / np.sqrt(len(v)):.2f}")


if __name__ == "__main__":
    main()
