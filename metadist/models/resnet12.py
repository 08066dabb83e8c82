"""ResNet-12, the backbone of MetaOptNet (Lee et al. 2019) and Meta-Baseline (Chen et al.
2021): four residual blocks, each three 3x3 conv + batch norm layers with a leaky ReLU
after the first two, a 1x1 conv + batch norm shortcut added to the third, a leaky ReLU
after the sum, then 2x2 max-pool; the last feature map averaged; a linear head.

What it follows, block for block: Meta-Baseline's ``resnet12-wide``
(yinboc/few-shot-meta-baseline, models/resnet12.py), which is MetaOptNet's block
(kjunelee/MetaOptNet, models/ResNet12_embedding.py) without its DropBlock:
- convolutions without bias, 3x3 with padding 1, and a 1x1 conv + batch norm shortcut in
  every block (both codes project in every block);
- leaky ReLU of slope 0.1; 2x2 max-pool, stride 2 (84 -> 42 -> 21 -> 10 -> 5);
- widths 64-160-320-640 (``widths``);
- convolutions initialised Kaiming-normal, fan-out, leaky-ReLU gain (``a`` = 0, so
  sqrt(2), as both codes call it); batch-norm weights 1, biases 0;
- global average pooling of the last map (Meta-Baseline; MetaOptNet flattens its 5x5x640
  map for the SVM head unless ``avg_pool``);
- parameter names as in the state dict of Meta-Baseline's ``ResNet12`` module
  (``layer1.conv1.weight``, ``layer1.downsample.0.weight``, ...), so its weights map onto
  these by name.
At the default widths on 3-channel images that is 12,424,320 parameters, and a 5-way head
adds 3,205 (12,427,525).

Where it differs: batch norm is transductive like the Conv4's (each batch's own
statistics, at training and at test, no running averages; see ``layers.batch_norm``);
the head is the Conv4's linear head on the pooled features. DropBlock (MetaOptNet's, size
5 after blocks 3 and 4) runs only when a caller passes one (``features(..., drop=)``):
supervised pre-training does; evaluation, inner loops and meta-training never do (the
vmap inner loop refuses random numbers). MetaOptNet's plain dropout after blocks 1 and 2
is not there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from metadist.models import layers

Params = dict[str, Tensor]

LEAKY_SLOPE = 0.1  # both reference codes' nn.LeakyReLU(0.1)
DROPBLOCK_BLOCKS = (3, 4)  # MetaOptNet's: after the last two stages' max-pool


@dataclass(frozen=True)
class ResNet12:
    ways: int
    in_channels: int = 3
    widths: tuple[int, ...] = (64, 160, 320, 640)

    head_keys = ("head.weight", "head.bias")
    impls = ("native", "matmul")  # both: second-order MAML may run under vmap

    def __post_init__(self) -> None:
        widths = tuple(self.widths)
        if len(widths) != 4 or not all(isinstance(w, int) and not isinstance(w, bool)
                                       and w > 0 for w in widths):
            raise ValueError(f"model.widths={list(widths)} must be 4 positive integers "
                             "(the residual blocks' widths)")
        object.__setattr__(self, "widths", widths)  # a checkpoint's spec holds a list

    @property
    def norm_keys(self) -> tuple[str, ...]:
        """The batch-norm weights and biases (MAML++ keeps a copy per inner step)."""
        return tuple(f"{norm}.{p}" for block in range(1, 5)
                     for norm in (*(f"layer{block}.bn{j}" for j in (1, 2, 3)),
                                  f"layer{block}.downsample.1")
                     for p in ("weight", "bias"))

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]

    def init_params(self, generator: torch.Generator | None = None) -> Params:
        params: Params = {}

        def conv(name: str, out_channels: int, in_channels: int, size: int) -> None:
            weight = torch.empty(out_channels, in_channels, size, size)
            torch.nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="leaky_relu",
                                          generator=generator)
            params[name] = weight

        def norm(name: str, channels: int) -> None:
            params[f"{name}.weight"] = torch.ones(channels)
            params[f"{name}.bias"] = torch.zeros(channels)

        channels = self.in_channels
        for block, width in enumerate(self.widths, start=1):
            for j in (1, 2, 3):
                conv(f"layer{block}.conv{j}.weight", width, channels if j == 1 else width, 3)
                norm(f"layer{block}.bn{j}", width)
            conv(f"layer{block}.downsample.0.weight", width, channels, 1)
            norm(f"layer{block}.downsample.1", width)
            channels = width
        return {**params, **layers.head_params(self.ways, self.feature_dim, generator)}

    def features(self, params: Params, x: Tensor, impl: str = "native",
                 drop: layers.DropBlock | None = None,
                 remat: layers.Remat | None = None) -> Tensor:
        """The pooled features; ``drop``: DropBlock after blocks 3 and 4 (training only);
        ``remat``: each residual block's three units run through it (``layers.Remat``)."""
        if drop is not None and impl != "native":
            raise ValueError("DropBlock runs on the native layers only")

        def unit(h: Tensor, conv: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
            out = layers.batch_norm(layers.conv2d(h, conv, 1, impl), weight, bias, impl)
            return F.leaky_relu(out, LEAKY_SLOPE)

        def last_unit(out: Tensor, h: Tensor, conv: Tensor, weight: Tensor, bias: Tensor,
                      shortcut_conv: Tensor, shortcut_weight: Tensor, shortcut_bias: Tensor
                      ) -> Tensor:
            out = layers.batch_norm(layers.conv2d(out, conv, 1, impl), weight, bias, impl)
            shortcut = layers.batch_norm(layers.conv1x1(h, shortcut_conv, impl),
                                         shortcut_weight, shortcut_bias, impl)
            return layers.max_pool2(F.leaky_relu(out + shortcut, LEAKY_SLOPE), impl)

        def conv_norm(p: str, j: int) -> tuple[Tensor, Tensor, Tensor]:
            return (params[f"{p}conv{j}.weight"], params[f"{p}bn{j}.weight"],
                    params[f"{p}bn{j}.bias"])

        # For ``remat`` a residual block is three units: the first two conv-norm-ReLU
        # layers, then the third with the shortcut, the sum and the pool. Units rather than
        # whole blocks: the first block (84x84, the most pixels) would otherwise hold all its
        # maps at once while the backward passes through it (full size on a CPU: 1.6 GB
        # against 2.1 GB for whole blocks, benchmarks/second_order_memory.py).
        run = remat or layers.run_block
        h = layers.to_layout(x, impl)
        for block in range(1, 5):
            p = f"layer{block}."
            out = run(unit, run(unit, h, *conv_norm(p, 1)), *conv_norm(p, 2))
            h = run(last_unit, out, h, *conv_norm(p, 3), params[f"{p}downsample.0.weight"],
                    params[f"{p}downsample.1.weight"], params[f"{p}downsample.1.bias"])
            if drop is not None and block in DROPBLOCK_BLOCKS:
                h = layers.drop_block(h, drop, block)
        return layers.to_nchw(h, impl).mean(dim=(2, 3))

    def head(self, params: Params, features: Tensor) -> Tensor:
        return layers.head(params, features)

    def __call__(self, params: Params, x: Tensor, impl: str = "native",
                 remat: layers.Remat | None = None) -> Tensor:
        return self.head(params, self.features(params, x, impl, remat=remat))

