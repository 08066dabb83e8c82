"""Backbones as a user writes them, for ``model.name=python:backbone_factories:NAME`` in
tests/test_backbones.py (the tests folder is on ``sys.path`` under pytest)."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """Two conv + batch norm + ReLU + pool blocks, averaged: [N, 1, H, W] -> [N, 6]."""

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def tiny_cnn() -> nn.Module:
    return TinyCNN()


class Scaled(nn.Module):
    """State beside the parameters: a buffer, which a model must not keep."""

    def __init__(self) -> None:
        super().__init__()
        self.body = TinyCNN()
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.scale


def with_a_buffer() -> nn.Module:
    return Scaled()


def not_a_module() -> int:
    return 42


def image_map() -> nn.Module:
    """Yields [N, C, H, W] maps, not feature vectors."""
    return nn.Conv2d(1, 2, 3)
