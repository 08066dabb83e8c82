"""Where and how reproducibly a run computes: its device and its seeds."""

from __future__ import annotations

import math
import random

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"train.device={name!r} is not a device: auto, cpu, cuda or cuda:N"
                         ) from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"train.device={name!r}: metadist runs on auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"train.device={name!r} but this machine has "
                         f"{torch.cuda.device_count()} CUDA devices")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class NonFiniteError(ValueError):
    """A loss or a score came out NaN or infinite: the run has diverged (a learning rate
    too large, bad data) and its numbers mean nothing, so it stops instead of reporting."""


def check_finite(value: float, what: str, hint: str) -> float:
    if not math.isfinite(value):
        raise NonFiniteError(f"{what} is {value}: {hint}")
    return value
