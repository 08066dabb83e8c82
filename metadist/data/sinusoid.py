"""The sinusoid regression task family of Finn et al. (2017), generated, no files needed.

A task is y = A sin(x - φ) with amplitude A ~ U[0.1, 5], phase φ ~ U[0, π] and inputs
x ~ U[-5, 5]. Episode i of a stream is drawn from its own generator seeded with
(seed, stream, i), so it is the same whatever order or process asks for it, and the
training, validation and test streams never share a task whatever their seeds.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from metadist.data.episodes import Episode, MetaBatch, stack_episodes

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)


class SinusoidTasks:
    """Episodes of ``shots`` support and ``queries`` query points of one sinusoid each."""

    STREAMS = {"train": 0, "val": 1, "test": 2}

    def __init__(
        self, *, shots: int = 10, queries: int = 10, seed: int = 0, stream: str = "train"
    ) -> None:
        if shots < 1 or queries < 0:
            raise ValueError(f"need shots >= 1 and queries >= 0, got {shots} and {queries}")
        if stream not in self.STREAMS:
            raise ValueError(f"stream must be one of {list(self.STREAMS)}, got {stream!r}")
        self.shots, self.queries, self.seed, self.stream = shots, queries, seed, stream

    def episode(self, index: int) -> Episode:
        rng = np.random.default_rng([self.seed, self.STREAMS[self.stream], index])
        amplitude = rng.uniform(*AMPLITUDE)
        phase = rng.uniform(*PHASE)
        x = rng.uniform(*X_RANGE, size=(self.shots + self.queries, 1))
        y = amplitude * np.sin(x - phase)
        x_t = torch.from_numpy(x).float()
        y_t = torch.from_numpy(y).float()
        k = self.shots
        return Episode(x_t[:k], y_t[:k], x_t[k:], y_t[k:])

    def meta_batch(self, step: int, size: int) -> MetaBatch:
        episodes = [self.episode(step * size + i) for i in range(size)]
        return stack_episodes(episodes)
