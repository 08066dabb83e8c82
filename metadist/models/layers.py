"""Functional layers with two interchangeable implementations.

``native`` uses PyTorch's NCHW convolution and pooling kernels: the fastest choice when
every task shares one set of weights, and the reference the other path is tested against.

``matmul`` works channels-last and computes each 3x3 convolution as one im2col matrix
product. Under ``torch.func.vmap`` with per-task weights (every task after its first
inner step) that product becomes a single ``bmm`` over tasks, whereas vmap turns the
native convolution into a grouped convolution, which is several times slower on CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

BN_EPS = 1e-5


def conv2d(x: Tensor, weight: Tensor, stride: int, impl: str) -> Tensor:
    """3x3 'same' convolution without bias; ``x`` is NCHW for ``native``, NHWC for ``matmul``."""
    if impl == "native":
        return F.conv2d(x, weight, stride=stride, padding=1)
    n, h, w, c = x.shape
    out_channels, _, kh, kw = weight.shape
    padded = F.pad(x, (0, 0, 1, 1, 1, 1))
    h_out, w_out = (h - 1) // stride + 1, (w - 1) // stride + 1
    # im2col from strided slices rather than Tensor.unfold: slicing has vmap batching
    # rules for its backward, unfold_backward does not (it falls back to a slow loop).
    cols = torch.cat(
        [
            padded[:, dy : dy + stride * (h_out - 1) + 1 : stride,
                   dx : dx + stride * (w_out - 1) + 1 : stride]
            for dy in range(kh)
            for dx in range(kw)
        ],
        dim=-1,
    ).reshape(n * h_out * w_out, kh * kw * c)
    w_mat = weight.permute(0, 2, 3, 1).reshape(out_channels, kh * kw * c)
    out = cols @ w_mat.t()
    return out.view(n, h_out, w_out, out_channels)


def conv1x1(x: Tensor, weight: Tensor, impl: str) -> Tensor:
    """1x1 convolution without bias (a residual shortcut's projection); layouts as
    ``conv2d``'s. Channels-last, it is one matrix product over the pixels."""
    if impl == "native":
        return F.conv2d(x, weight)
    return x @ weight.flatten(1).t()


def batch_norm(x: Tensor, weight: Tensor, bias: Tensor, impl: str) -> Tensor:
    """Batch norm with the batch's own statistics (no running averages).

    This is the transductive setting of Finn et al. (2017): every episode, support and
    query alike, is normalised with its own statistics, at training and at test time.

    It computes in the parameters' precision: under bf16 autocast the convolution hands
    over bf16, whose 8-bit mantissa makes the batch's variance, and every gradient through
    it, coarse; and vmap's batch-norm backward rejects a bf16 input with float32 weights.
    """
    x = x.to(weight.dtype)
    if impl == "native":
        return F.batch_norm(x, None, None, weight, bias, training=True, eps=BN_EPS)
    mean = x.mean(dim=(0, 1, 2))
    var = x.var(dim=(0, 1, 2), unbiased=False)
    return (x - mean) * torch.rsqrt(var + BN_EPS) * weight + bias


def max_pool2(x: Tensor, impl: str) -> Tensor:
    """2x2 max pooling, stride 2, dropping an odd last row/column like ``max_pool2d``."""
    if impl == "native":
        return F.max_pool2d(x, 2)
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).amax(dim=(2, 4))


# A model's blocks run through one of these when a caller passes it:
# ``remat(block, h, *weights)`` returns ``block(h, *weights)``, the block's output, however
# it keeps (or does not keep) what the block's backward needs. The algorithms pass one that
# recomputes each block in the backward pass (``train.recompute_query``).
Remat = Callable[..., Tensor]


def run_block(block: Callable[..., Tensor], h: Tensor, *weights: Tensor) -> Tensor:
    """The plain ``Remat``: the block, its graph kept."""
    return block(h, *weights)


def head_params(ways: int, features: int, generator: torch.Generator | None = None
                ) -> dict[str, Tensor]:
    """The linear head every few-shot model ends in: ``head.weight`` [ways, features]
    Xavier-initialised, ``head.bias`` zero."""
    weight = torch.empty(ways, features)
    torch.nn.init.xavier_uniform_(weight, generator=generator)
    return {"head.weight": weight, "head.bias": torch.zeros(ways)}


def head(params: dict[str, Tensor], features: Tensor) -> Tensor:
    """Linear scores; a head that carries ``head.scale`` is a cosine head (its rows unit
    vectors, see ``metadist.algorithms.heads.cosine_head``): the features are normalised
    first, so the scores are ``scale`` times the cosine similarities."""
    if "head.scale" in params:
        features = F.normalize(features, dim=-1)
        return params["head.scale"] * (features @ params["head.weight"].t()) + params["head.bias"]
    return features @ params["head.weight"].t() + params["head.bias"]


@dataclass(frozen=True)
class DropBlock:
    """DropBlock (Ghiasi et al. 2018) as MetaOptNet applies it to ResNet-12's last stages:
    square blocks of ``size`` x ``size`` units of a feature map set to zero, about a
    ``rate`` fraction of the units, the rest scaled up to keep the map's sum.

    The random numbers come from ``noise(block, shape)``: uniform [0, 1) noise of ``shape``
    for the seed positions of residual block ``block`` (one per position where a whole
    block fits, for this call's rows). The caller owns the randomness, so it can make it a
    function of its seed and step alone (what keeps a resumed or a sharded run exact).
    A model called without a ``DropBlock`` drops nothing: evaluation, inner loops and
    meta-training never pass one.
    """

    rate: float
    size: int
    noise: Callable[[int, tuple[int, ...]], Tensor]


def drop_block(x: Tensor, drop: DropBlock, block: int) -> Tensor:
    """``x`` (NCHW) with DropBlock's blocks dropped. Seeds fall with probability γ at the
    positions where a whole block fits (MetaOptNet's γ = rate / size² · HW / ((H - size + 1)
    (W - size + 1)), so that about ``rate`` of the units drop); each seed zeroes the block
    whose top-left corner it is. The kept units are scaled by units / kept, per example
    (MetaOptNet scales per batch: per example makes a row's output independent of the other
    rows, so a batch cut into shards computes the same)."""
    if drop.rate <= 0:
        return x
    n, c, h, w = x.shape
    size = min(drop.size, h, w)
    seeds_h, seeds_w = h - size + 1, w - size + 1
    gamma = drop.rate / size**2 * (h * w) / (seeds_h * seeds_w)
    noise = drop.noise(block, (n, c, seeds_h, seeds_w)).to(x.device)
    seeds = (noise < gamma).to(x.dtype)
    dropped = F.max_pool2d(F.pad(seeds, (size - 1,) * 4), size, stride=1)  # [n, c, h, w]
    keep = 1 - dropped
    scale = (c * h * w) / keep.sum(dim=(1, 2, 3), keepdim=True).clamp_min(1)
    return x * keep * scale


def to_layout(x: Tensor, impl: str) -> Tensor:
    """NCHW input to the layout ``impl`` computes in."""
    return x if impl == "native" else x.permute(0, 2, 3, 1)


def to_nchw(x: Tensor, impl: str) -> Tensor:
    return x if impl == "native" else x.permute(0, 3, 1, 2)
