"""N-way K-shot episodes drawn reproducibly from a ClassStore.

Episode ``i`` depends only on (seed, i): its draws come from
``numpy.random.default_rng([seed, i])``, so any process can build any episode in any
order and get the same tensors, which is what lets episode production be spread over
workers without changing results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from metadist.data.schema import MAX_IMAGE_SIZE, Manifest
from metadist.data.store import ClassStore


class Episode(NamedTuple):
    """Support and query sets, class-major: rows of label 0 first, then label 1, ..."""

    support_x: torch.Tensor  # float32 [N*K, C, H, W]
    support_y: torch.Tensor  # int64 [N*K], values 0..N-1
    query_x: torch.Tensor  # float32 [N*Q, C, H, W]
    query_y: torch.Tensor  # int64 [N*Q]


class MetaBatch(NamedTuple):
    """T episodes stacked along a leading task dimension."""

    support_x: torch.Tensor  # float32 [T, N*K, C, H, W]
    support_y: torch.Tensor  # int64 [T, N*K]
    query_x: torch.Tensor  # float32 [T, N*Q, C, H, W]
    query_y: torch.Tensor  # int64 [T, N*Q]


def stack_episodes(episodes: Sequence[Episode]) -> MetaBatch:
    """Episodes stacked along a new leading task dimension."""
    return MetaBatch(*(torch.stack(parts) for parts in zip(*episodes, strict=True)))


class EpisodePlan(NamedTuple):
    """The random draws of one episode, before any image is loaded."""

    classes: np.ndarray  # int64 [N]: virtual class of label j is classes[j]
    examples: np.ndarray  # int64 [N, K+Q]: positions within each class; first K = support


@dataclass(frozen=True)
class Preprocessing:
    """uint8 -> float in [0, 1] -> ``1 - x`` if ``invert`` -> ``(x - mean) / std``."""

    image_size: int
    channels: int
    invert: bool = False
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) \
                or not 1 <= self.image_size <= MAX_IMAGE_SIZE:
            raise ValueError(f"image_size must be an integer in [1, {MAX_IMAGE_SIZE}], got "
                             f"{self.image_size!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        for name in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) == 1:  # one value applies to every channel
                values = values * self.channels
            if len(values) != self.channels:
                raise ValueError(f"{name} needs 1 or {self.channels} values, got {len(values)}")
            object.__setattr__(self, name, values)
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")

    @classmethod
    def from_manifest(
        cls, manifest: Manifest, *, image_size: int | None = None, channels: int | None = None
    ) -> Preprocessing:
        """The manifest's recommended preprocessing, optionally at another size/channels."""
        pre = manifest.preprocessing
        channels = pre.channels if channels is None else channels
        mean, std = pre.mean, pre.std
        if channels != pre.channels:
            # Per-channel statistics don't carry over; their average is the best guess.
            mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
        return cls(
            pre.image_size if image_size is None else image_size, channels, pre.invert, mean, std
        )

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [..., C, H, W] -> float32 [..., C, H, W]."""
        x = images.to(torch.float32, copy=True).div_(255.0)  # never modify the caller's tensor
        if self.invert:
            x = x.neg_().add_(1.0)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        return x.sub_(mean).div_(std)


def _count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class EpisodeSampler:
    """Reproducible ``ways``-way ``shots``-shot episodes with ``queries`` queries per class.

    All feasibility checks happen here, at construction, rather than at whichever episode
    happens to draw an unsuitable class.
    """

    def __init__(
        self,
        store: ClassStore,
        *,
        ways: int,
        shots: int,
        queries: int,
        seed: int = 0,
        preprocessing: Preprocessing | None = None,
    ) -> None:
        self.store = store
        self.ways = _count("ways", ways, 1)
        self.shots = _count("shots", shots, 1)
        self.queries = _count("queries", queries, 0)
        self.seed = _count("seed", seed, 0)  # default_rng refuses negative seeds
        if preprocessing is None:
            preprocessing = Preprocessing.from_manifest(
                store.manifest, image_size=store.image_size, channels=store.channels
            )
        elif (preprocessing.image_size, preprocessing.channels) != (
            store.image_size,
            store.channels,
        ):
            raise ValueError(
                f"preprocessing wants {preprocessing.channels}x{preprocessing.image_size}px "
                f"images but the store yields {store.channels}x{store.image_size}px; open the "
                "store with the same image_size and channels"
            )
        self.preprocessing = preprocessing

        where = f"split {store.split!r} ({store.split_dir})"
        if self.ways > store.num_classes:
            raise ValueError(
                f"ways={self.ways} is more than the {store.num_classes} classes of {where}"
            )
        need = self.shots + self.queries
        small = [(e.label, e.count) for e in store.manifest.classes if e.count < need]
        if small:
            label, count = small[0]
            more = f" (and {len(small) - 1} more classes)" if len(small) > 1 else ""
            raise ValueError(
                f"class {label!r} of {where} has {count} examples, fewer than shots+queries="
                f"{self.shots}+{self.queries}={need}{more}"
            )

    def plan(self, index: int) -> EpisodePlan:
        """Which classes and examples episode ``index`` uses; loads nothing."""
        rng = np.random.default_rng([self.seed, _count("episode index", index, 0)])
        classes = rng.choice(self.store.num_classes, size=self.ways, replace=False)
        need = self.shots + self.queries
        examples = np.stack(
            [rng.choice(self.store.class_size(int(c)), size=need, replace=False) for c in classes]
        )
        return EpisodePlan(classes.astype(np.int64), examples.astype(np.int64))

    def episode(self, index: int) -> Episode:
        plan = self.plan(index)
        images = torch.stack(
            [
                self.store.load_examples(int(c), rows)
                for c, rows in zip(plan.classes, plan.examples, strict=True)
            ]
        )  # uint8 [N, K+Q, C, H, W]
        x = self.preprocessing.apply(images)
        n, k, q = self.ways, self.shots, self.queries
        shape = x.shape[2:]
        labels = torch.arange(n, dtype=torch.int64)
        return Episode(
            support_x=x[:, :k].reshape(n * k, *shape),
            support_y=labels.repeat_interleave(k),
            query_x=x[:, k:].reshape(n * q, *shape),
            query_y=labels.repeat_interleave(q),
        )

    def meta_batch(self, step: int, size: int) -> MetaBatch:
        """Episodes ``step*size`` .. ``step*size + size - 1``, stacked."""
        step, size = _count("step", step, 0), _count("size", size, 1)
        episodes = [self.episode(step * size + t) for t in range(size)]
        return stack_episodes(episodes)
