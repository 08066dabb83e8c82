"""Checkpoints: plain tensors and plain data only, so they load with
``torch.load(weights_only=True)`` and no pickle from a checkpoint ever runs code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

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
