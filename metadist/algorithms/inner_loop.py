"""The inner loop: a few steps of SGD on one task's support set, as a pure function.

``functional=False`` is the plain reference (``torch.autograd.grad`` per task);
``functional=True`` uses ``torch.func.grad`` so the same function can be ``vmap``-ed over
the tasks of a meta-batch. Both return adapted parameters that stay differentiable with
respect to the initial ones, so the outer gradient flows through the adaptation: fully
(second-order MAML) or through the identity path only (``first_order``).

Each step may use a minibatch of the support set (rows ``order[step]``) and Adam instead of
SGD, as Reptile does (Nichol et al. 2018). Adam's moments start at zero for every task, or
from given ``moments`` (``Moments``: a state carried from task to task, see
``CarriedMoments`` in ``meta.py``).

``recompute``: each second-order SGD step is one autograd node that keeps only its inputs
and runs again during the outer backward (``recompute.py``), so the memory of the outer
graph stops growing with the number of steps; the meta-gradient is the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from metadist.algorithms.recompute import recomputed

Params = dict[str, Tensor]
Model = Callable[..., Tensor]
# Adam's state: the number of steps it has taken (for the bias correction) and each adapted
# parameter's first and second moments.
Moments = tuple[int, dict[str, tuple[Tensor, Tensor]]]


def task_loss(model: Model, params: Params, x: Tensor, y: Tensor, impl: str = "native") -> Tensor:
    return output_loss(model(params, x, impl), y)


def output_loss(out: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy for integer labels (classification), mean squared error otherwise."""
    if y.dtype in (torch.int64, torch.int32):
        return F.cross_entropy(out, y)
    return F.mse_loss(out, y)


def adapt(model: Model, params: Params, x: Tensor, y: Tensor, **options) -> Params:
    """``adapt_with_moments``'s adapted parameters alone."""
    return adapt_with_moments(model, params, x, y, **options)[0]


def adapt_with_moments(
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
    order: Tensor | None = None,
    optimizer: str = "sgd",
    betas: tuple[float, float] = (0.0, 0.999),
    moments: Moments | None = None,
    rates: Params | None = None,
    step_rates: Params | None = None,
    step_norms: Params | None = None,
    trajectory: list | None = None,
    recompute: bool = False,
) -> tuple[Params, Moments]:
    """Return ``params`` after ``steps`` steps of ``optimizer`` (``sgd`` or ``adam``) at
    ``lr`` on (x, y), and Adam's state after the last step (SGD: no moments). ``keys``
    limits which parameters adapt (ANIL adapts the head only). ``order`` ([steps, batch]
    row indices, see ``minibatch_order``) gives each step's minibatch; None: every step
    uses all of (x, y). ``moments``: Adam's state to start from; None: zero. ``rates``:
    a learning rate per entry of each adapted parameter, in place of ``lr`` (Meta-SGD);
    ``step_rates``: a rate per adapted parameter and step ([S]; steps past S take the
    last), in place of ``lr`` (MAML++'s LSLR). The outer gradient reaches both through
    the update. ``step_norms``: MAML++'s per-step batch-norm weights and biases, each
    [S, ...]: the forward passes of step t (its support loss, and the query after it)
    use ``params``' own entry at t = 0 and row t - 1 from then on (steps past S take the
    last); they are not adapted. The returned parameters carry the last step's.
    ``trajectory``: a list that gets the parameters after each step. ``recompute``: a
    second-order SGD step keeps only its inputs for the outer backward and is recomputed
    there (first-order steps keep no inner graph and are taken as they are)."""
    keys = list(params) if keys is None else list(keys)
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"inner optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    if order is not None and order.shape[0] < steps:
        raise ValueError(f"order has {order.shape[0]} minibatches for {steps} steps")
    taken, state = (0, {}) if moments is None else (moments[0], dict(moments[1]))
    if step_norms:
        keys = [k for k in keys if k not in step_norms]
    recompute = recompute and not first_order and torch.is_grad_enabled()
    if recompute and optimizer != "sgd":
        raise ValueError("recompute takes SGD steps; a second-order inner Adam is refused")
    for t in range(steps):
        xs, ys = (x, y) if order is None else (x[order[t]], y[order[t]])
        if recompute:
            params = {**params, **_recomputed_sgd_step(
                model, _norms_at(params, step_norms, t), xs, ys, keys, impl, functional,
                {k: _rate(k, t, lr, rates, step_rates) for k in keys})}
            if trajectory is not None:
                trajectory.append(_norms_at(params, step_norms, t))
            continue
        grads = _grads(model, _norms_at(params, step_norms, t), xs, ys, keys, first_order,
                       impl, functional)
        if optimizer == "adam":
            grads = _adam_directions(grads, state, taken + t + 1, betas)
        params = {**params, **{k: params[k] - _rate(k, t, lr, rates, step_rates) * grads[k]
                               for k in keys}}
        if trajectory is not None:
            trajectory.append(_norms_at(params, step_norms, t))
    return (_norms_at(params, step_norms, steps - 1),
            (taken + steps if optimizer == "adam" else taken, state))


def _recomputed_sgd_step(model: Model, params: Params, x: Tensor, y: Tensor,
                         keys: list[str], impl: str, functional: bool, rates: dict) -> Params:
    """One second-order SGD step on (x, y) of ``keys`` at ``rates`` (a float or a tensor
    per key), as a node that keeps its inputs alone and recomputes in the outer backward.
    Its inputs are every tensor the step reads: all of ``params`` (the batch-norm set of
    this step among them), the rates that are tensors (Meta-SGD's, LSLR's), and x (ANIL's
    support features carry the body's gradient)."""
    names = list(params)
    learned = [k for k in keys if isinstance(rates[k], Tensor)]
    fixed = {k: r for k, r in rates.items() if k not in learned}

    def step(x: Tensor, y: Tensor, *tensors: Tensor, create_graph: bool
             ) -> tuple[Tensor, ...]:
        p = dict(zip(names, tensors))
        rate = {**fixed, **dict(zip(learned, tensors[len(names):]))}
        grads = _grads(model, p, x, y, keys, not create_graph, impl, functional)
        return tuple(p[k] - rate[k] * grads[k] for k in keys)

    out = recomputed(step, x, y, *params.values(), *(rates[k] for k in learned),
                     functional=functional)
    return dict(zip(keys, out))


def _norms_at(params: Params, step_norms: Params | None, t: int) -> Params:
    """``params`` with step ``t``'s batch-norm weights and biases (see ``step_norms``)."""
    if not step_norms or t <= 0:
        return params
    return {**params, **{k: v[min(t, v.shape[0]) - 1] for k, v in step_norms.items()
                         if v.shape[0]}}


def _rate(key: str, t: int, lr: float, rates: Params | None, step_rates: Params | None):
    if rates is not None:
        return rates[key]
    if step_rates is not None:
        per_step = step_rates[key]
        return per_step[min(t, per_step.shape[0] - 1)]
    return lr


def _adam_directions(
    grads: Params, moments: dict[str, tuple[Tensor, Tensor]], t: int,
    betas: tuple[float, float], eps: float = 1e-8,
) -> Params:
    """Adam's bias-corrected m̂ / (√v̂ + ε) for step ``t`` (1-based); updates ``moments``."""
    b1, b2 = betas
    out = {}
    for k, g in grads.items():
        m, v = moments.get(k, (torch.zeros_like(g), torch.zeros_like(g)))
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        moments[k] = (m, v)
        out[k] = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    return out


def minibatch_order(size: int, batch: int, steps: int, rng: np.random.Generator) -> Tensor:
    """Row indices [steps, batch] of each inner step's minibatch: passes over the ``size``
    rows, each in a fresh random order, cut into consecutive minibatches (a minibatch may
    span two passes), as Nichol et al.'s Reptile samples them."""
    passes = math.ceil(steps * batch / size)
    rows = np.concatenate([rng.permutation(size) for _ in range(passes)])
    return torch.from_numpy(rows[: steps * batch].reshape(steps, batch))


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
