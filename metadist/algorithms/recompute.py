"""Recomputation of the inner loop's steps during the outer backward, so that second-order
MAML keeps one inner step's graph at a time instead of all of them.

Plain second-order MAML keeps, for every inner step, the forward graph of the support
loss and the graph of its gradient (``create_graph=True``) until the outer backward
reaches it: memory grows with the number of inner steps. With recomputation an inner step
is one autograd node that keeps only its inputs (the parameters it starts from, its
learning rates, its batch-norm set, the support set) and, when the outer backward reaches
it, runs the step again to take the vector-Jacobian product through it,
``v -> v - α H v`` (and the rates' and the batch norms' parts): one Hessian-vector
product, exactly what the kept graph would have given, in the same arithmetic. The cost
is one more forward and inner backward per step (the recomputation); the memory is the
query's graph, one step's graph at a time, and the parameters after every step (K copies
of the adapted parameters, which plain MAML keeps as well).

Why not ``torch.utils.checkpoint``: in torch 2.14.1 the non-reentrant checkpoint
(``use_reentrant=False``) gives the exact meta-gradient around a step that calls
``torch.autograd.grad(create_graph=True)``, and its memory stops growing with the steps,
but the inner ``grad`` inside the checkpointed forward unpacks the tensors the forward has
just saved, which makes it recompute the step during the forward already: each step runs
three times instead of two (the benchmark below counts them; pytorch/pytorch#102223
reports the extra run), and it holds more than one step's graph. The reentrant
checkpoint runs the step once in the forward but refuses ``torch.autograd.grad`` for the
outer gradient ("incompatible with .grad()"), which ``meta_gradient`` takes. Neither runs
under ``torch.func.vmap`` with ``torch.func.grad`` inside, as the vmap inner loop needs:
the non-reentrant one's saved-tensor hooks are refused ("torch.func.{grad, vjp, ...}
don't yet support saved tensor hooks"), the reentrant one's ``autograd.Function`` has no
``setup_context``.
``benchmarks/second_order_memory.py`` measures them side by side.

So a step here is a custom ``autograd.Function`` that saves its inputs and recomputes in
its backward: with plain autograd on the loop path, and, under vmap, with ``torch.func``
(``torch.func.grad`` in the step, ``torch.func.vjp`` in the backward,
``generate_vmap_rule`` to batch it over tasks). The ``torch.func`` recomputation took
more memory than plain autograd's in a check by hand, so the loop uses the latter.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def recomputed(fn: Callable[..., tuple[Tensor, ...]], *inputs: Tensor,
               functional: bool = False) -> tuple[Tensor, ...]:
    """``fn(*inputs)`` as one autograd node that keeps ``inputs`` alone and recomputes
    ``fn`` in the backward pass to take its vector-Jacobian product (for the inputs that
    need a gradient). ``fn(*inputs, create_graph=...)`` must be a deterministic function of
    its tensors returning a tuple of tensors; ``create_graph`` says whether its result
    will be differentiated (the recomputation) or only its value is wanted (the forward).
    ``functional``: ``fn`` is written with ``torch.func`` (``torch.func.grad`` for a
    gradient inside it) and the node runs under ``vmap``; otherwise with plain autograd
    (``torch.autograd.grad``), whose recomputation takes less memory (see above). The
    gradient of the result is exact; the node is not differentiable twice (the outer
    gradient is the last derivative MAML takes). The backward runs under the autocast
    state of the forward."""
    device = next((t.device.type for t in inputs if isinstance(t, Tensor)), "cpu")
    autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
    node = _RecomputedFunctional if functional else _Recomputed
    return node.apply(fn, autocast, *inputs)


class _Recomputed(torch.autograd.Function):
    """Plain autograd: the forward takes ``fn``'s value, the backward runs ``fn`` again
    with its graph and differentiates it."""

    @staticmethod
    def forward(ctx, fn, autocast, *inputs):
        ctx.fn, ctx.autocast = fn, autocast
        ctx.save_for_backward(*inputs)
        with torch.enable_grad():  # an inner gradient needs its graph, built and dropped
            out = fn(*(t.detach() for t in inputs), create_graph=False)
        return tuple(t.detach() for t in out)

    @staticmethod
    def backward(ctx, *cotangents):
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[2:]) if need]
        # Every floating-point input takes part in the graph (an inner gradient is taken
        # with respect to some of them); the gradient is taken for the wanted ones.
        tensors = [t.detach().requires_grad_(t.is_floating_point()) for t in ctx.saved_tensors]
        device, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            out = ctx.fn(*tensors, create_graph=True)
            grads = torch.autograd.grad(out, [tensors[i] for i in wanted], cotangents,
                                        allow_unused=True)
        return (None, None, *_scatter(len(tensors), wanted, grads, tensors))


class _RecomputedFunctional(torch.autograd.Function):
    """``torch.func``: the forward takes ``fn``'s value, the backward its
    ``torch.func.vjp``; ``generate_vmap_rule`` lets ``vmap`` batch the node over tasks."""

    generate_vmap_rule = True

    @staticmethod
    def forward(fn, autocast, *inputs):
        return tuple(fn(*inputs, create_graph=False))

    @staticmethod
    def setup_context(ctx, inputs, output):
        fn, autocast, *tensors = inputs
        ctx.fn, ctx.autocast = fn, autocast
        ctx.save_for_backward(*tensors)

    @staticmethod
    def backward(ctx, *cotangents):
        tensors = list(ctx.saved_tensors)
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[2:]) if need]

        def of_wanted(*values: Tensor) -> tuple[Tensor, ...]:
            full = list(tensors)
            for i, value in zip(wanted, values):
                full[i] = value
            return tuple(ctx.fn(*full, create_graph=True))

        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            _, vjp = torch.func.vjp(of_wanted, *(tensors[i] for i in wanted))
            grads = vjp(tuple(cotangents))
        return (None, None, *_scatter(len(tensors), wanted, grads, tensors))


def _scatter(n: int, wanted: list[int], grads, tensors: list[Tensor]) -> list[Tensor | None]:
    """The gradient of each of ``n`` inputs: None where none was wanted, zeros where the
    result does not depend on the input."""
    out: list[Tensor | None] = [None] * n
    for i, grad in zip(wanted, grads):
        out[i] = torch.zeros_like(tensors[i]) if grad is None else grad
    return out
