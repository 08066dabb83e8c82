"""Random crops and horizontal flips of uint8 image batches, from explicit draws.

The random numbers are drawn apart from the images (``Augmentation.draws``: one row per
image, from a generator the caller seeds) and applied by ``Augmentation.apply``, so a
caller can draw a whole batch's rows from ``(seed, step)`` and apply any slice of them:
the images a worker augments do not depend on which worker it is, and a resumed run
draws the same numbers again.

- ``crop_flip``: pad every side by ``padding`` pixels, crop ``image_size`` at a random
  offset, flip with probability 1/2 (torchvision's ``RandomCrop(size, padding)`` and
  ``RandomHorizontalFlip``; MetaOptNet's and Meta-Baseline's ``augment: crop``).
- ``resized_crop_flip``: torchvision's ``RandomResizedCrop`` (scale 0.08-1, aspect ratio
  3/4-4/3, ten tries, then the centre crop) resized back to ``image_size`` by the one
  resize of the data (``images.resize``), and the flip (Meta-Baseline's ``augment: resize``).
- ``none``: the images as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from metadist.data.images import resize

AUGMENTATIONS = ("none", "crop_flip", "resized_crop_flip")
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
TRIES = 10


@dataclass(frozen=True)
class Augmentation:
    kind: str
    image_size: int
    padding: int = 8  # crop_flip's, on every side
    fill: int = 0  # the padding's value (uint8): black, or the background of inverted data

    def __post_init__(self) -> None:
        if self.kind not in AUGMENTATIONS:
            raise ValueError(f"augmentation {self.kind!r} is not one of {list(AUGMENTATIONS)}")

    @property
    def width(self) -> int:
        """Random numbers per image."""
        return {"none": 0, "crop_flip": 3, "resized_crop_flip": 1 + 4 * TRIES}[self.kind]

    def draws(self, rng: np.random.Generator, images: int) -> np.ndarray:
        """Uniform [0, 1) numbers for ``images`` images, a row each."""
        return rng.random((images, self.width))

    def apply(self, images: torch.Tensor, draws: np.ndarray) -> torch.Tensor:
        """uint8 [N, C, S, S] images, ``draws`` [N, width]: new uint8 [N, C, S, S]."""
        if self.kind == "none":
            return images
        if len(draws) != len(images):
            raise ValueError(f"{len(draws)} rows of draws for {len(images)} images")
        s = self.image_size
        out = []
        if self.kind == "crop_flip":
            p = self.padding
            padded = F.pad(images, (p, p, p, p), value=self.fill)
            for image, (flip, dy, dx) in zip(padded, draws, strict=True):
                y, x = int(dy * (2 * p + 1)), int(dx * (2 * p + 1))
                out.append(_flipped(image[:, y:y + s, x:x + s], flip))
        else:
            for image, row in zip(images, draws, strict=True):
                top, left, h, w = resized_crop_box(image.shape[-2], image.shape[-1], row[1:])
                out.append(_flipped(resize(image[:, top:top + h, left:left + w], s), row[0]))
        return torch.stack(out).contiguous()


def resized_crop_box(height: int, width: int, draws: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, h, w) of ``RandomResizedCrop``'s crop from 4 numbers per try: an area
    fraction in ``SCALE``, a log aspect ratio in ``RATIO``, and the two offsets; the first
    try that fits wins, else the centre crop (torchvision's rule)."""
    area = height * width
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for u_area, u_ratio, u_top, u_left in draws.reshape(TRIES, 4):
        target = area * (SCALE[0] + u_area * (SCALE[1] - SCALE[0]))
        ratio = math.exp(log_ratio[0] + u_ratio * (log_ratio[1] - log_ratio[0]))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
    ratio = width / height  # the centre crop, its ratio clamped into RATIO
    if ratio < RATIO[0]:
        w, h = width, round(width / RATIO[0])
    elif ratio > RATIO[1]:
        h, w = height, round(height * RATIO[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _flipped(image: torch.Tensor, draw: float) -> torch.Tensor:
    return image.flip(-1) if draw < 0.5 else image
