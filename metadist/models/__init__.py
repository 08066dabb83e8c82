"""Functional few-shot models: parameters are an explicit dict, never module state."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from metadist.config import ModelConfig
from metadist.models.conv4 import Conv4
from metadist.models.mlp import MLP

MODELS = {"conv4": Conv4, "mlp": MLP}


def build_model(
    cfg: ModelConfig, *, ways: int, in_channels: int, image_size: int | None
) -> Conv4 | MLP:
    if cfg.name == "mlp":
        return MLP(in_features=in_channels, hidden=tuple(cfg.mlp_hidden), out_features=1)
    return Conv4(
        ways=ways, in_channels=in_channels, hidden=cfg.hidden, image_size=image_size or 28,
        pool=cfg.pool, readout=cfg.readout,
    )


def model_spec(model: Conv4 | MLP) -> dict[str, Any]:
    """Plain data (safe for ``torch.load(weights_only=True)``) that rebuilds the model."""
    kind = next(name for name, cls in MODELS.items() if isinstance(model, cls))
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(model).items()}
    return {"kind": kind, "kwargs": kwargs}


def model_from_spec(spec: dict[str, Any]) -> Conv4 | MLP:
    cls = MODELS[spec["kind"]]
    kwargs = dict(spec["kwargs"])
    if cls is MLP:
        kwargs["hidden"] = tuple(kwargs["hidden"])
    return cls(**kwargs)


__all__ = ["MLP", "MODELS", "Conv4", "build_model", "model_from_spec", "model_spec"]
