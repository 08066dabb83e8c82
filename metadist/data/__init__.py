"""Few-shot data on the read path: Parquet shards -> classes -> seeded episodes.

See ``metadist.data.schema`` for the on-disk layout; the converters that write it are in
``metadist.data.ingest``.
"""

from metadist.data.episodes import Episode, EpisodePlan, EpisodeSampler, MetaBatch, Preprocessing
from metadist.data.schema import SHARD_SCHEMA, DatasetInfo, Manifest
from metadist.data.store import ClassStore

__all__ = [
    "SHARD_SCHEMA",
    "ClassStore",
    "DatasetInfo",
    "Episode",
    "EpisodePlan",
    "EpisodeSampler",
    "Manifest",
    "MetaBatch",
    "Preprocessing",
]

_MOVED = {"convert_imagefolder", "convert_miniimagenet", "convert_omniglot", "make_synthetic"}


def __getattr__(name: str):
    # A migration message, not an import: the read path never loads the converters.
    if name in _MOVED:
        raise AttributeError(f"metadist.data.{name} moved: use "
                             f"`from metadist.data.ingest import {name}`")
    raise AttributeError(f"module 'metadist.data' has no attribute {name!r}")
