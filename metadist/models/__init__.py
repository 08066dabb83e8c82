"""Functional few-shot models: parameters are an explicit dict, never module state."""

from __future__ import annotations

import math
import os
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch

from metadist.models.backbone import PYTHON, SOURCES, ModuleBackbone
from metadist.models.conv4 import Conv4
from metadist.models.mlp import MLP
from metadist.models.resnet12 import ResNet12

if TYPE_CHECKING:  # the models know nothing of configs; a ModelConfig is only read here
    from metadist.config import ModelConfig

# A checkpoint's model spec names one of these kinds. ``model.name`` is one of
# MODEL_NAMES, or a ModuleBackbone's source (torchvision:NAME, python:package.module:callable).
MODELS = {"conv4": Conv4, "mlp": MLP, "resnet12": ResNet12, "module": ModuleBackbone}
MODEL_NAMES = ("conv4", "mlp", "resnet12")
Model = Conv4 | MLP | ResNet12 | ModuleBackbone

# Set to 1 to let a checkpoint whose model is a python: factory import that factory (the
# opt-in for code that ``model_from_spec(..., trust_code=True)`` gives in Python).
TRUST_CODE_ENV = "METADIST_TRUST_CODE"


def build_model(
    cfg: ModelConfig, *, ways: int, in_channels: int, image_size: int | None
) -> Model:
    if cfg.name == "mlp":
        if image_size is not None:
            raise ValueError("model.name='mlp' takes feature rows (the sinusoid tasks), and "
                             f"this dataset holds {image_size}x{image_size} images: use "
                             "model.name=conv4")
        return MLP(in_features=in_channels, hidden=tuple(cfg.mlp_hidden), out_features=1)
    if cfg.name != "conv4" and image_size is None:
        raise ValueError(f"model.name={cfg.name!r} takes images, and this dataset holds "
                         "feature rows: use model.name=mlp")
    if cfg.name == "resnet12":
        return ResNet12(ways=ways, in_channels=in_channels, widths=tuple(cfg.widths))
    if cfg.name.startswith(SOURCES):  # the user's own config: its python: factory may run
        return ModuleBackbone(cfg.name, ways=ways, in_channels=in_channels,
                              image_size=image_size)
    return Conv4(
        ways=ways, in_channels=in_channels, hidden=cfg.hidden, image_size=image_size or 28,
        pool=cfg.pool, readout=cfg.readout,
    )


def second_order_under_vmap(model: Model) -> bool:
    """Whether second-order MAML may run ``model`` under vmap: that takes metadist's im2col
    layers (``impl="matmul"``), which a torch module backbone has not."""
    return "matmul" in model.impls


def model_spec(model: Model) -> dict[str, Any]:
    """Plain data (safe for ``torch.load(weights_only=True)``) that rebuilds the model."""
    kind = next(name for name, cls in MODELS.items() if isinstance(model, cls))
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(model).items()}
    return {"kind": kind, "kwargs": kwargs}


# Far beyond any few-shot backbone here (Conv4: ~0.1M, ResNet-12: ~12M): a spec asking for
# more (a corrupt or hostile checkpoint) is refused before anything is allocated.
MAX_PARAMETERS = 2**30


def model_from_spec(spec: Any, *, trust_code: bool | None = None) -> Model:
    """The model a checkpoint describes; ValueError for a spec that is not one.

    A checkpoint is data: its spec never makes this import code of its choosing. A
    ``torchvision:`` backbone must be one of torchvision's models; a ``python:`` factory is
    imported only with ``trust_code`` (None: the environment variable METADIST_TRUST_CODE
    set to 1)."""
    if not isinstance(spec, dict) or spec.get("kind") not in MODELS \
            or not isinstance(spec.get("kwargs"), dict):
        raise ValueError(f"model spec {_short(spec)}: expected {{'kind': one of "
                         f"{sorted(MODELS)}, 'kwargs': {{...}}}}")
    cls = MODELS[spec["kind"]]
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["kwargs"].items()}
    if cls is ModuleBackbone:
        source = kwargs.get("source")
        if not isinstance(source, str):
            raise ValueError(f"model spec {_short(spec)}: its source must be a string")
        if trust_code is None:
            trust_code = os.environ.get(TRUST_CODE_ENV, "") == "1"
        if source.startswith(PYTHON) and not trust_code:
            raise ValueError(
                f"model spec {_short(spec)}: the model is built by {source!r}, Python code "
                "that loading this checkpoint would import and run; it is only imported on "
                f"request: if you trust the checkpoint, set {TRUST_CODE_ENV}=1 (or pass "
                "trust_code=True)")
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


def param_shapes(model: Model) -> dict[str, tuple[int, ...]]:
    """The model's parameter shapes, allocating nothing (tensors on the meta device)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in model.init_params().items()}


def check_params(model: Model, params: Any, where: str, *,
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
    "MAX_PARAMETERS", "MLP", "MODELS", "MODEL_NAMES", "TRUST_CODE_ENV", "Conv4", "Model",
    "ModuleBackbone", "ResNet12", "build_model", "check_params", "model_from_spec",
    "model_spec", "param_shapes", "second_order_under_vmap",
]
