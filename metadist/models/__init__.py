"""Functional few-shot models: parameters are an explicit dict, never module state."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from metadist.models.conv4 import Conv4
from metadist.models.mlp import MLP

if TYPE_CHECKING:  # the models know nothing of configs; a ModelConfig is only read here
    from metadist.config import ModelConfig

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


def check_params(model: Conv4 | MLP, params: dict, where: str) -> None:
    """Parameters loaded from a file must be exactly the model's, with the model's shapes."""
    expected = {k: tuple(v.shape) for k, v in model.init_params().items()}
    got = {k: tuple(v.shape) for k, v in params.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        shapes = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        raise ValueError(
            f"{where}: parameters do not match the model {model!r}: missing {missing}, "
            f"unexpected {extra}, wrong shape {shapes}"
        )


__all__ = [
    "MLP", "MODELS", "Conv4", "build_model", "check_params", "model_from_spec", "model_spec",
]
