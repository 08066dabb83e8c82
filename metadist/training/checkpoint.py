"""Checkpoints: plain tensors and plain data only, so they load with
``torch.load(weights_only=True)`` and no pickle from a checkpoint ever runs code.

``load_trained`` is the one way from a checkpoint file to a model with its parameters:
the meta-test, the Learner and a resumed run all go through it.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metadist.algorithms import CarriedMoments, MetaStep, model_keys
from metadist.algorithms.meta import extra_shapes
from metadist.config import Config, config_from_dict
from metadist.models import check_params, model_from_spec, model_spec, param_shapes

FORMAT = "metadist-checkpoint/1"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write atomically: a crash mid-write never leaves a truncated checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for foreign or corrupt files
        raise ValueError(f"{path}: not a loadable metadist checkpoint ({err})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a metadist checkpoint (format {FORMAT} expected)")
    return state


@dataclass
class Trained:
    """A checkpoint's model: its config, the rebuilt model and its checked parameters."""

    path: str
    state: dict[str, Any]
    config: Config
    model: Any
    params: dict[str, Tensor]

    def carried_moments(self, step: MetaStep, device: torch.device | str) -> CarriedMoments | None:
        """The inner Adam state the run carried (``algorithm.inner_state=carried``), else
        None."""
        if step.inner_state != "carried":
            return None
        carried = CarriedMoments()
        if self.state.get("inner_moments") is not None:
            carried.load_state_dict(self.state["inner_moments"], device)
        return carried


def load_trained(path: str | Path, device: str | torch.device = "cpu",
                 model=None, *, trust_code: bool | None = None) -> Trained:
    """Load ``path`` and check its parameters against ``model`` (a resumed run's own),
    or against the model the checkpoint describes. ``trust_code``: whether a model built
    by a ``python:`` factory may import it (see ``model_from_spec``)."""
    state = load_checkpoint(path, map_location=device)
    missing = [k for k in ("config", "model", "params", "step") if k not in state]
    if missing:
        raise ValueError(f"{path}: not a complete metadist checkpoint (no {missing})")
    # Through the config schema: a checkpoint from before a key existed gets its default.
    try:
        config = config_from_dict(state["config"])
    except ValueError as err:
        raise ValueError(f"{path}: its config: {err}") from None
    if model is None:
        try:
            model = model_from_spec(state["model"], trust_code=trust_code)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    # Learned inner rates (Meta-SGD's, MAML++'s) and MAML++'s per-step batch norms are
    # parameters beside the model's.
    try:
        check_params(model, state["params"], str(path),
                     extra=extra_shapes(param_shapes(model), config.algorithm, model.norm_keys))
    except ValueError as err:
        if "pretrain" in state:  # resumed as if it were a meta-training run of its own
            raise ValueError(f"{err}. It is a supervised pre-training checkpoint: start "
                             f"meta-training from its backbone with model.pretrained={path}"
                             ) from None
        raise
    params = {k: v.to(device) for k, v in state["params"].items()}
    return Trained(str(path), state, config, model, params)


def pretrained_backbone(path: str | Path, model) -> dict[str, Tensor]:
    """The backbone of checkpoint ``path`` for ``model``: every parameter of ``model`` but
    its head (``model.head_keys``), taken from the checkpoint's parameters by name (what
    ``model.pretrained`` starts a run from). The checkpoint's own head and anything an
    algorithm kept beside its model (learned rates, per-step batch norms) are left out. A
    parameter missing, of another shape, or one the checkpoint's backbone has and
    ``model`` lacks is an error that names it."""
    where = f"model.pretrained={path}"
    try:
        state = load_checkpoint(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: no such checkpoint") from None
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    params = state.get("params")
    if not isinstance(params, dict) or not all(isinstance(v, Tensor) for v in params.values()):
        raise ValueError(f"{where}: the checkpoint holds no parameters")
    spec = state.get("model", {})
    theirs = f"{spec.get('kind')} {spec.get('kwargs')}" if isinstance(spec, dict) else "?"
    shapes = param_shapes(model)
    wanted = [k for k in shapes if k not in model.head_keys]
    missing = [k for k in wanted if k not in params]
    if missing:
        raise ValueError(
            f"{where}: the checkpoint has no parameter {missing[0]!r} ({len(missing)} of this "
            f"model's {len(wanted)} backbone parameters missing): it was trained with another "
            f"architecture ({theirs}) than this run's {model!r}")
    for k in wanted:
        if tuple(params[k].shape) != shapes[k]:
            raise ValueError(
                f"{where}: parameter {k!r} is {list(params[k].shape)} in the checkpoint and "
                f"{list(shapes[k])} in this model: it was trained with another architecture "
                f"({theirs}) than this run's {model!r}")
        if not params[k].is_floating_point():
            raise ValueError(f"{where}: parameter {k!r} is not floating point")
    head = ("head.weight", "head.bias")
    extra = sorted(k for k in model_keys(params) if k not in shapes and k not in head)
    if extra:
        raise ValueError(f"{where}: the checkpoint's backbone has parameters this model lacks, "
                         f"{extra[:5]}: it was trained with another architecture ({theirs}) "
                         f"than this run's {model!r}")
    # Same shapes can still be another network (a max-pool Conv4's weights in a stride-2
    # one): the model's other settings must be the checkpoint's too.
    ours = model_spec(model)
    if isinstance(spec, dict) and isinstance(spec.get("kwargs"), dict):
        for key, value in ours["kwargs"].items():
            if key in ("ways", "in_channels", "image_size"):  # the head's; the shapes' own
                continue
            their = spec["kwargs"].get(key)
            if (list(their) if isinstance(their, tuple) else their) != value:
                name = "model.name" if key == "source" else f"model.{key}"
                raise ValueError(f"{where}: the checkpoint's model has {key}={their!r}, and "
                                 f"this run's {key}={value!r} ({name})")
    return {k: params[k].detach().clone() for k in wanted}


def rng_state() -> dict[str, Any]:
    # Plain data only (checkpoints load with weights_only=True).
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
        "python": json.dumps(random.getstate()),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    key = state["numpy"]["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, state["numpy"]["pos"], 0, 0.0))
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
