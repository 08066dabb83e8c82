"""The 1-40-40-1 ReLU network of the sinusoid regression experiments (Finn et al. 2017)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

Params = dict[str, Tensor]


@dataclass(frozen=True)
class MLP:
    in_features: int = 1
    hidden: tuple[int, ...] = (40, 40)
    out_features: int = 1

    head_keys = ("head.weight", "head.bias")
    impls = ("native", "matmul")  # no layer differs: both are the same computation
    norm_keys = ()  # no batch norm

    def init_params(self, generator: torch.Generator | None = None) -> Params:
        params: Params = {}
        sizes = (self.in_features, *self.hidden)
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            params[f"fc{i}.weight"] = _kaiming_uniform(fan_out, fan_in, generator)
            params[f"fc{i}.bias"] = torch.zeros(fan_out)
        params["head.weight"] = _kaiming_uniform(self.out_features, sizes[-1], generator)
        params["head.bias"] = torch.zeros(self.out_features)
        return params

    def features(self, params: Params, x: Tensor, impl: str = "native") -> Tensor:
        for i in range(len(self.hidden)):
            x = torch.relu(x @ params[f"fc{i}.weight"].t() + params[f"fc{i}.bias"])
        return x

    def head(self, params: Params, features: Tensor) -> Tensor:
        return features @ params["head.weight"].t() + params["head.bias"]

    def __call__(self, params: Params, x: Tensor, impl: str = "native") -> Tensor:
        return self.head(params, self.features(params, x, impl))


def _kaiming_uniform(fan_out: int, fan_in: int, generator: torch.Generator | None) -> Tensor:
    weight = torch.empty(fan_out, fan_in)
    torch.nn.init.kaiming_uniform_(weight, a=5**0.5, generator=generator)
    return weight
