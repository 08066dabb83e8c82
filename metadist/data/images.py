"""Decoding of stored image bytes: full-decode validation for converters, arrays for readers."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

_BATCH = 512  # images read ahead per decode round
# Modes whose pixels carry no colour; anything else is stored/decoded as RGB.
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def inspect_image(data: bytes, name: str) -> tuple[str, tuple[int, int]]:
    """Decode ``data`` completely and return (PIL mode, (height, width)).

    ``Image.verify()`` alone misses truncated pixel data, so this runs a full ``load()``.
    Raises ``ValueError`` naming ``name`` when the bytes are not a decodable image.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.mode, (im.height, im.width)
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ...)
        raise ValueError(f"{name}: not a decodable image ({type(exc).__name__}: {exc})") from exc


def inspect_images(
    names: Sequence[str], read: Callable[[str], bytes], describe: Callable[[str], str]
) -> list[tuple[str, tuple[int, int]]]:
    """Read and fully decode every image, in order; the first failure raises ``ValueError``.

    Reading stays on the calling thread (``zipfile`` is not reliably thread-safe); decoding
    runs in a few threads since Pillow releases the GIL while decoding. Work goes in
    batches so memory stays bounded for large image folders.
    """
    workers = min(4, os.cpu_count() or 1)
    if workers == 1 or len(names) < 64:
        return [inspect_image(read(n), describe(n)) for n in names]
    results: list[tuple[str, tuple[int, int]]] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(names), _BATCH):
            batch = names[start : start + _BATCH]
            blobs = [read(n) for n in batch]
            results.extend(pool.map(inspect_image, blobs, [describe(n) for n in batch]))
    return results


def summarize(infos: Iterable[tuple[str, tuple[int, int]]]) -> tuple[str, tuple[int, int] | None]:
    """Manifest image info from per-image (mode, size): ("L" | "RGB", shared [H, W] or None)."""
    modes: set[str] = set()
    sizes: set[tuple[int, int]] = set()
    for mode, size in infos:
        modes.add(mode)
        sizes.add(size)
    mode = "L" if modes <= _GREY_MODES else "RGB"
    return mode, (next(iter(sizes)) if len(sizes) == 1 else None)


def decode_image(data: bytes, channels: int) -> np.ndarray:
    """Decode to a uint8 array [H, W, channels] (1 -> "L", 3 -> "RGB")."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        # np.array, not np.asarray: PIL's buffer is read-only, and a tensor made from a
        # read-only array is undefined behaviour the moment anything writes to it.
        array = np.array(im, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [..., C, H, W] to [..., C, size, size]: the one resize of training and use."""
    # Imported here: torchvision.transforms.v2 costs ~2 s at import, paid by every process
    # that reads a manifest (Ray actors included) and needed only by the ones that decode.
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as tvf

    if list(images.shape[-2:]) != [size, size]:
        images = tvf.resize(
            images, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True
        )
    return images.contiguous()


def load_image(item: object, channels: int, size: int) -> torch.Tensor:
    """A file path, encoded image file (bytes), PIL image or array (H, W[, C], uint8 or
    floats in [0, 1]) as the uint8 [C, size, size] tensor the stored images decode to."""
    if isinstance(item, bytes | bytearray | memoryview):
        item = io.BytesIO(item)
    if isinstance(item, str | os.PathLike | io.BytesIO):
        with Image.open(item) as im:
            im.load()
            image = im
    elif isinstance(item, Image.Image):
        image = item
    else:
        array = item.numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
        if array.dtype != np.uint8:
            array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[2] not in (1, 3):
            array = array.transpose(1, 2, 0)  # CHW -> HWC
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.ndim not in (2, 3):
            raise ValueError(f"image array must be (H, W) or (H, W, C), got shape {array.shape}")
        image = Image.fromarray(array)
    array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return resize(torch.from_numpy(array.copy()).permute(2, 0, 1), size)
