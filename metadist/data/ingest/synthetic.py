"""Synthetic image datasets in the shard format, for scale and throughput tests only.

Each class is a random smooth prototype image; its examples are the prototype plus
Gaussian noise, PNG-encoded. Manifests say ``synthetic: true`` so no result obtained on
this data can be mistaken for one on real data.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from metadist.data.ingest.splits import split_by_fraction
from metadist.data.ingest.writer import ClassData, SplitData, check_output, write_dataset
from metadist.data.schema import ImageInfo, PreprocessingInfo, SourceInfo

SYNTHETIC_SOURCE = "SYNTHETIC: generated, not real data (random class prototypes plus noise)"
_NOISE_STD = 40.0  # in uint8 units: examples of a class vary, prototypes stay recognisable


def make_synthetic(
    out: str | Path,
    *,
    classes: int = 100,
    images_per_class: int = 20,
    image_size: int = 28,
    channels: int = 1,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic dataset named "synthetic" at ``out``; deterministic in ``seed``."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    for what, value in (
        ("classes", classes),
        ("images_per_class", images_per_class),
        ("image_size", image_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be a positive integer, got {value!r}")
    check_output(out, overwrite)

    labels = [f"class-{i:05d}" for i in range(classes)]
    chosen = split_by_fraction(labels, val_fraction, test_fraction, seed)
    mode = "L" if channels == 1 else "RGB"
    # Images are generated on demand from their path, so memory stays flat at any scale.
    paths = {label: [f"{label}/{j:05d}.png" for j in range(images_per_class)] for label in labels}
    render = _Renderer(seed, image_size, channels)

    preprocessing = PreprocessingInfo(
        image_size, channels, False, (0.5,) * channels, (0.5,) * channels
    )
    splits = {
        split: SplitData(
            classes=[ClassData(c, None, paths[c], render) for c in names],
            source=SourceInfo(SYNTHETIC_SOURCE, None),
            image=ImageInfo(mode, (image_size, image_size)),
            preprocessing=preprocessing,
            rotations=(0,),
            method="seeded-fraction",
            seed=seed,
            synthetic=True,
        )
        for split, names in chosen.items()
    }
    args = {
        "classes": classes,
        "images_per_class": images_per_class,
        "image_size": image_size,
        "channels": channels,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "seed": seed,
    }
    return write_dataset(
        out,
        splits,
        dataset="synthetic",
        overwrite=overwrite,
        converter={"function": f"{__name__}.make_synthetic", "args": args},
    )


class _Renderer:
    """path "class-IIIII/JJJJJ.png" -> PNG bytes, deterministic in (seed, I, J)."""

    def __init__(self, seed: int, size: int, channels: int) -> None:
        self.seed, self.size, self.channels = seed, size, channels
        self._proto: tuple[int, np.ndarray] | None = None  # the writer reads class by class

    def __call__(self, path: str) -> bytes:
        label, file = path.split("/")
        index, j = int(label.removeprefix("class-")), int(file.removesuffix(".png"))
        if self._proto is None or self._proto[0] != index:
            self._proto = (index, self._prototype(np.random.default_rng([self.seed, index, 0])))
        rng = np.random.default_rng([self.seed, index, j + 1])
        proto = self._proto[1]
        pixels = np.clip(proto + rng.normal(0.0, _NOISE_STD, proto.shape), 0, 255)
        return _png(pixels.astype(np.uint8))

    def _prototype(self, rng: np.random.Generator) -> np.ndarray:
        # Upsampled coarse noise gives blob-like structure that survives resizing.
        side = max(2, self.size // 4)
        coarse = rng.integers(0, 256, (side, side, self.channels), dtype=np.uint8)
        image = Image.fromarray(coarse[:, :, 0] if self.channels == 1 else coarse)
        smooth = image.resize((self.size, self.size), Image.Resampling.BILINEAR)
        return np.asarray(smooth, dtype=np.float64).reshape(self.size, self.size, self.channels)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # compress_level=1: generation speed matters more than size for test data.
    Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(
        buffer, format="PNG", compress_level=1
    )
    return buffer.getvalue()
