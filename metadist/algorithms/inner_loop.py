"""The inner loop: a few steps of SGD on one task's support set, as a pure function.

``functional=False`` is the plain reference (``torch.autograd.grad`` per task);
``functional=True`` uses ``torch.func.grad`` so the same function can be ``vmap``-ed over
the tasks of a meta-batch. Both return adapted parameters that stay differentiable with
respect to the initial ones, so the outer gradient flows through the adaptation: fully
(second-order MAML) or through the identity path only (``first_order``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Params = dict[str, Tensor]
Model = Callable[..., Tensor]


def task_loss(model: Model, params: Params, x: Tensor, y: Tensor, impl: str = "native") -> Tensor:
    return output_loss(model(params, x, impl), y)


def output_loss(out: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy for integer labels (classification), mean squared error otherwise."""
    if y.dtype in (torch.int64, torch.int32):
        return F.cross_entropy(out, y)
    return F.mse_loss(out, y)


def adapt(
    model: Model,
    params: Params,
    x: Tensor,
    y: Tensor,
    *,
    lr: float,
    steps: int,
    first_order: bool = False,
    keys: Sequence[str] | None = None,
    impl: str = "native",
    functional: bool = False,
) -> Params:
    """Return ``params`` after ``steps`` SGD steps of ``lr`` on (x, y); ``keys`` limits
    which parameters adapt (ANIL adapts the head only)."""
    keys = list(params) if keys is None else list(keys)
    for _ in range(steps):
        grads = _grads(model, params, x, y, keys, first_order, impl, functional)
        params = {**params, **{k: params[k] - lr * grads[k] for k in keys}}
    return params


def _grads(
    model: Model,
    params: Params,
    x: Tensor,
    y: Tensor,
    keys: list[str],
    first_order: bool,
    impl: str,
    functional: bool,
) -> Params:
    if functional:

        def loss_of(adapted: Params) -> Tensor:
            return task_loss(model, {**params, **adapted}, x, y, impl)

        grads = torch.func.grad(loss_of)({k: params[k] for k in keys})
        return {k: g.detach() for k, g in grads.items()} if first_order else grads
    if not all(params[k].requires_grad for k in keys):
        # Evaluation and Reptile adapt without an outer graph; the inner step still needs one.
        params = {**params, **{k: params[k].detach().requires_grad_() for k in keys}}
    loss = task_loss(model, params, x, y, impl)
    create_graph = not first_order and torch.is_grad_enabled()
    grads = torch.autograd.grad(loss, [params[k] for k in keys], create_graph=create_graph)
    return dict(zip(keys, grads))
