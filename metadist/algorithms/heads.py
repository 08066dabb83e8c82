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
al. 2021's Classifier-Baseline and Meta-Baseline): ``algorithm.temperature``, or, with
``algorithm.learn_temperature``, a parameter ``temperature`` that starts there and is
meta-learned with the rest (Meta-Baseline's).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

HEAD_INITS = ("learned", "prototypes", "zero")
METRICS = ("euclidean", "cosine")
# The cosine prototypes' learned scale, a scalar among the parameters when learned.
TEMPERATURE_KEY = "temperature"


def prototypes(features: Tensor, labels: Tensor, ways: int) -> Tensor:
    """Mean feature of each class [ways, D]; ``labels`` 0..ways-1, every class present."""
    onehot = F.one_hot(labels, ways).to(features.dtype)  # [S, ways]
    return (onehot.t() @ features) / onehot.sum(0)[:, None]


def prototype_head(features: Tensor, labels: Tensor, ways: int) -> dict[str, Tensor]:
    c = prototypes(features, labels, ways)
    return {"head.weight": 2 * c, "head.bias": -(c * c).sum(-1)}


def cosine_head(features: Tensor, labels: Tensor, ways: int, scale: float | Tensor
                ) -> dict[str, Tensor]:
    """Unit-length class means and the scale (a learned one stays a tensor, so the outer
    gradient reaches it); ``layers.head`` normalises the queries' features when a head has
    ``head.scale``."""
    c = F.normalize(prototypes(features, labels, ways), dim=-1)
    if not isinstance(scale, Tensor):
        scale = c.new_tensor(float(scale))
    return {"head.weight": c, "head.bias": c.new_zeros(ways), "head.scale": scale}


def zero_head(features: Tensor, ways: int) -> dict[str, Tensor]:
    return {"head.weight": features.new_zeros(ways, features.shape[-1]),
            "head.bias": features.new_zeros(ways)}


def task_head(model, params: dict[str, Tensor], x: Tensor, y: Tensor, ways: int, init: str,
              impl: str = "native", metric: str = "euclidean", scale: float = 10.0
              ) -> dict[str, Tensor]:
    """``params`` with the head for this task's ``ways`` classes: the meta-learned one
    (``learned``), or one built from the support set (x, y); prototypes by ``metric``,
    cosine ones scaled by ``params[TEMPERATURE_KEY]`` where learned, else ``scale``."""
    if init == "learned":
        return params
    features = model.features(params, x, impl)
    if init == "zero":
        head = zero_head(features, ways)
    elif metric == "cosine":
        head = cosine_head(features, y, ways, params.get(TEMPERATURE_KEY, scale))
    else:
        head = prototype_head(features, y, ways)
    return {**params, **head}


def ways_of(labels: Tensor) -> int:
    """The number of classes of a batch of tasks' support labels (labels 0..N-1). Read
    outside ``vmap``: a shape must be a Python number there."""
    return int(labels.max().item()) + 1
