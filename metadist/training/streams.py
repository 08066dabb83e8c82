"""Opens the three episode streams of a run (train, val, test) from its data config.

``data.dataset`` is ``sinusoid``, a local directory or an object-store URI
(``s3://bucket/omniglot``); see ``metadist.data.location``.
"""

from __future__ import annotations

from dataclasses import dataclass

from metadist.config import DataConfig, train_episode_shape
from metadist.data.episodes import EpisodeSampler, MetaBatch, Preprocessing, stack_episodes
from metadist.data.location import Location
from metadist.data.schema import MANIFEST_NAME, Manifest
from metadist.data.sinusoid import SinusoidTasks
from metadist.data.store import ClassStore


@dataclass
class Streams:
    train: object
    val: object
    test: object
    preprocessing: Preprocessing | None  # None for generated (sinusoid) tasks
    in_channels: int
    image_size: int | None


def open_streams(data: DataConfig, *, train_seed: int, eval_seed: int) -> Streams:
    """Training episodes follow ``train_seed`` (and ``data.train_shots``/``train_queries``
    where set); validation and test follow ``eval_seed``."""
    shape = {"train": train_episode_shape(data),
             "eval": (data.ways, data.shots, data.queries)}
    if data.dataset == "sinusoid":
        def tasks(seed: int, stream: str) -> SinusoidTasks:
            _, shots, queries = shape["train" if stream == "train" else "eval"]
            return SinusoidTasks(shots=shots, queries=queries, seed=seed, stream=stream)

        return Streams(
            tasks(train_seed, "train"), tasks(eval_seed, "val"), tasks(eval_seed, "test"),
            None, 1, None,
        )
    root = Location.of(data.dataset)
    if not root.is_dir():
        raise FileNotFoundError(
            f"data.dataset={root}: no such dataset directory (convert one with "
            "`metadist data convert ...`, or use data.dataset=sinusoid)"
        )
    pre = training_preprocessing(data)

    def sampler(split: str, seed: int, stream: str) -> EpisodeSampler:
        store = ClassStore(root / split, image_size=pre.image_size, channels=pre.channels,
                           decode_cache=data.decode_cache,
                           decode_cache_max_gb=data.decode_cache_max_gb)
        ways, shots, queries = shape[stream]
        return EpisodeSampler(
            store, ways=ways, shots=shots, queries=queries, seed=seed, preprocessing=pre,
        )

    return Streams(
        sampler(data.train_split, train_seed, "train"),
        sampler(data.val_split, eval_seed + 1, "eval"),
        sampler(data.test_split, eval_seed, "eval"),
        pre, pre.channels, pre.image_size,
    )


def training_preprocessing(data: DataConfig) -> Preprocessing:
    """The training split's recommended preprocessing, at the config's size/channels:
    the one preprocessing of every split and of the Learner."""
    return Preprocessing.from_manifest(
        Manifest.load(Location.of(data.dataset) / data.train_split / MANIFEST_NAME),
        image_size=data.image_size,
        channels=data.channels,
    )


def episode_batch(source, start: int, stop: int) -> MetaBatch:
    """Episodes ``start .. stop-1`` of a stream, stacked: any slice of any meta-batch, the
    same episodes whatever slices a run is cut into."""
    episodes = [source.episode(i) for i in range(start, stop)]
    if not episodes:  # a worker with no task this step still takes part in the all-reduce
        first = source.episode(0)
        return MetaBatch(*(t.unsqueeze(0)[:0] for t in first))
    return stack_episodes(episodes)
