"""The 4-block convolutional network of the few-shot literature (Vinyals et al. 2016;
Finn et al. 2017): four blocks of 3x3 conv, batch norm, ReLU and 2x2 max-pool (or a
stride-2 conv instead of the pool, as in Finn's Omniglot code), then a linear head.
Omniglot uses 64 filters on 28x28 inputs and averages the last feature map; miniImageNet
uses 32 filters on 84x84 inputs and flattens it (32 * 5 * 5 = 800 features).

The convolutions have no bias: batch norm subtracts each channel's mean right after, so a
bias there changes nothing but receives a gradient of pure round-off, which Adam then
scales up into steps of full size (and which made 1-worker and 2-worker runs differ).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from metadist.models import layers

Params = dict[str, Tensor]


@dataclass(frozen=True)
class Conv4:
    ways: int
    in_channels: int = 1
    hidden: int = 64
    image_size: int = 28
    pool: str = "max"  # "max" or "stride"
    readout: str = "mean"  # "mean" over the last feature map, or "flatten"
    blocks: int = 4

    head_keys = ("head.weight", "head.bias")
    impls = ("native", "matmul")  # see metadist.models.layers

    def __post_init__(self) -> None:
        if self.pool not in ("max", "stride"):
            raise ValueError(f"model.pool must be 'max' or 'stride', got {self.pool!r}")
        if self.readout not in ("mean", "flatten"):
            raise ValueError(f"model.readout must be 'mean' or 'flatten', got {self.readout!r}")

    @property
    def norm_keys(self) -> tuple[str, ...]:
        """The batch-norm weights and biases (MAML++ keeps a copy per inner step)."""
        return tuple(f"bn{i}.{p}" for i in range(self.blocks) for p in ("weight", "bias"))

    @property
    def feature_dim(self) -> int:
        if self.readout == "mean":
            return self.hidden
        side = self.image_size
        for _ in range(self.blocks):
            side = (side + 1) // 2 if self.pool == "stride" else side // 2
        return self.hidden * side * side

    def init_params(self, generator: torch.Generator | None = None) -> Params:
        params: Params = {}
        channels = self.in_channels
        for i in range(self.blocks):
            weight = torch.empty(self.hidden, channels, 3, 3)
            torch.nn.init.xavier_uniform_(weight, generator=generator)
            params[f"conv{i}.weight"] = weight
            params[f"bn{i}.weight"] = torch.ones(self.hidden)
            params[f"bn{i}.bias"] = torch.zeros(self.hidden)
            channels = self.hidden
        return {**params, **layers.head_params(self.ways, self.feature_dim, generator)}

    def features(self, params: Params, x: Tensor, impl: str = "native",
                 remat: layers.Remat | None = None) -> Tensor:
        """``remat``: each block runs through it (``layers.Remat``)."""
        stride = 2 if self.pool == "stride" else 1

        def block(h: Tensor, weight: Tensor, bn_weight: Tensor, bn_bias: Tensor) -> Tensor:
            h = torch.relu(layers.batch_norm(layers.conv2d(h, weight, stride, impl),
                                             bn_weight, bn_bias, impl))
            return layers.max_pool2(h, impl) if self.pool == "max" else h

        run = remat or layers.run_block
        h = layers.to_layout(x, impl)
        for i in range(self.blocks):
            h = run(block, h, params[f"conv{i}.weight"], params[f"bn{i}.weight"],
                    params[f"bn{i}.bias"])
        h = layers.to_nchw(h, impl)
        if self.readout == "mean":
            return h.mean(dim=(2, 3))
        return h.flatten(1)

    def head(self, params: Params, features: Tensor) -> Tensor:
        return layers.head(params, features)

    def __call__(self, params: Params, x: Tensor, impl: str = "native",
                 remat: layers.Remat | None = None) -> Tensor:
        return self.head(params, self.features(params, x, impl, remat))
