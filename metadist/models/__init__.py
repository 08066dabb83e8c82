"""Functional few-shot models: parameters are an explicit dict, never module state."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch

from metadist.models.conv4 import Conv4
from metadist.models.mlp import MLP

if TYPE_CHECKING:  # the models know nothing of configs; a ModelConfig is only read here
    from metadist.config import ModelConfig

MODELS = {"conv4": Conv4, "mlp": MLP}


def build_model(
    cfg: ModelConfig, *, ways: int, in_channels: int, image_size: int | None
) -> Conv4 | MLP:
    if cfg.name == "mlp":
        if image_size is not None:
            raise ValueError("model.name='mlp' takes feature rows (the sinusoid tasks), and "
                             f"this dataset holds {image_size}x{image_size} images: use "
                             "model.name=conv4")
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


# Far beyond any few-shot backbone here (Conv4: ~0.1M, ResNet-12: ~12M): a spec asking for
# more (a corrupt or hostile checkpoint) is refused before anything is allocated.
MAX_PARAMETERS = 2**30


def model_from_spec(spec: Any) -> Conv4 | MLP:
    """The model a checkpoint describes; ValueError for a spec that is not one."""
    if not isinstance(spec, dict) or spec.get("kind") not in MODELS \
            or not isinstance(spec.get("kwargs"), dict):
        raise ValueError(f"model spec {_short(spec)}: expected {{'kind': one of "
                         f"{sorted(MODELS)}, 'kwargs': {{...}}}}")
    cls = MODELS[spec["kind"]]
    kwargs = dict(spec["kwargs"])
    if cls is MLP and isinstance(kwargs.get("hidden"), list):
        kwargs["hidden"] = tuple(kwargs["hidden"])
    try:
        model = cls(**kwargs)
        shapes = param_shapes(model)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"model spec {_short(spec)}: {err}") from None
    count = sum(math.prod(shape) for shape in shapes.values())
    if count > MAX_PARAMETERS:
        raise ValueError(f"model spec {_short(spec)}: {count:,} parameters, more than "
                         f"{MAX_PARAMETERS:,}")
    return model


def param_shapes(model: Conv4 | MLP) -> dict[str, tuple[int, ...]]:
    """The model's parameter shapes, allocating nothing (tensors on the meta device)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in model.init_params().items()}


def check_params(model: Conv4 | MLP, params: Any, where: str, *,
                 extra: dict[str, tuple[int, ...]] | None = None) -> None:
    """Parameters loaded from a file must be exactly the model's: the same names and shapes,
    and floating point. (Non-finite values surface as a non-finite score.) ``extra``: the
    names and shapes of what an algorithm keeps beside them (learned inner rates)."""
    if not isinstance(params, dict) or not all(isinstance(v, torch.Tensor)
                                               for v in params.values()):
        raise ValueError(f"{where}: parameters must be a mapping of names to tensors")
    expected = {**param_shapes(model), **(extra or {})}
    got = {k: tuple(v.shape) for k, v in params.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        shapes = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        raise ValueError(
            f"{where}: parameters do not match the model {model!r}: missing {missing}, "
            f"unexpected {extra}, wrong shape {shapes}"
        )
    dtypes = sorted(k for k, v in params.items() if not v.is_floating_point())
    if dtypes:
        raise ValueError(f"{where}: parameters {dtypes} are not floating point "
                         f"({params[dtypes[0]].dtype})")


def _short(value: Any, width: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


__all__ = [
    "MAX_PARAMETERS", "MLP", "MODELS", "Conv4", "build_model", "check_params",
    "model_from_spec", "model_spec", "param_shapes",
]
