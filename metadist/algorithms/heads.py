"""Task-specific classifier heads, built from the support set: what lets a model adapt to
a task with any number of classes, and what a prototypical network is.

A linear head with weights ``2 c_k`` and biases ``-|c_k|²``, where ``c_k`` is the mean
embedding of class k's support examples, scores a query embedding z as
``2 c_k·z - |c_k|² = -|z - c_k|² + |z|²``: the prototypical network's logits (Snell et
al. 2017) up to ``|z|²``, which is the same for every class and so changes no softmax.
Proto-MAML (Triantafillou et al. 2020) starts MAML's inner loop from that head; a zero
head (all classes equal until the inner loop moves them) is the other any-way start.
Both are differentiable functions of the parameters, so the outer gradient flows through
the prototypes.

The prototypes' ``metric``: ``euclidean`` is the head above; ``cosine`` scores a query
by ``scale`` times the cosine similarity of its embedding to each class mean (Chen et
al. 2021's Classifier-Baseline and Meta-Baseline; their scale is learned, ours a fixed
``algorithm.temperature``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

HEAD_INITS = ("learned", "prototypes", "zero")
METRICS = ("euclidean", "cosine")


def prototypes(features: Tensor, labels: Tensor, ways: int) -> Tensor:
    """Mean feature of each class [ways, D]; ``labels`` 0..ways-1, every class present."""
    onehot = F.one_hot(labels, ways).to(features.dtype)  # [S, ways]
    return (onehot.t() @ features) / onehot.sum(0)[:, None]


def prototype_head(features: Tensor, labels: Tensor, ways: int) -> dict[str, Tensor]:
    c = prototypes(features, labels, ways)
    return {"head.weight": 2 * c, "head.bias": -(c * c).sum(-1)}


def cosine_head(features: Tensor, labels: Tensor, ways: int, scale: float
                ) -> dict[str, Tensor]:
    """Unit-length class means and the scale; ``layers.head`` normalises the queries'
    features when a head has ``head.scale``."""
    c = F.normalize(prototypes(features, labels, ways), dim=-1)
    return {"head.weight": c, "head.bias": c.new_zeros(ways),
            "head.scale": c.new_tensor(float(scale))}


def zero_head(features: Tensor, ways: int) -> dict[str, Tensor]:
    return {"head.weight": features.new_zeros(ways, features.shape[-1]),
            "head.bias": features.new_zeros(ways)}


def task_head(model, params: dict[str, Tensor], x: Tensor, y: Tensor, ways: int, init: str,
              impl: str = "native", metric: str = "euclidean", scale: float = 10.0
              ) -> dict[str, Tensor]:
    """``params`` with the head for this task's ``ways`` classes: the meta-learned one
    (``learned``), or one built from the support set (x, y); prototypes by ``metric``."""
    if init == "learned":
        return params
    features = model.features(params, x, impl)
    if init == "zero":
        head = zero_head(features, ways)
    elif metric == "cosine":
        head = cosine_head(features, y, ways, scale)
    else:
        head = prototype_head(features, y, ways)
    return {**params, **head}


def ways_of(labels: Tensor) -> int:
    """The number of classes of a batch of tasks' support labels (labels 0..N-1). Read
    outside ``vmap``: a shape must be a Python number there."""
    return int(labels.max().item()) + 1
