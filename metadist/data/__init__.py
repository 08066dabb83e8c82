"""Few-shot image data: converters to a sharded on-disk format, class store, episodes.

See ``metadist.data.schema`` for the on-disk layout.
"""

from metadist.data.convert import convert_imagefolder, convert_miniimagenet, convert_omniglot
from metadist.data.episodes import Episode, EpisodePlan, EpisodeSampler, MetaBatch, Preprocessing
from metadist.data.schema import SHARD_SCHEMA, DatasetInfo, Manifest
from metadist.data.store import ClassStore
from metadist.data.synthetic import make_synthetic

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
    "convert_imagefolder",
    "convert_miniimagenet",
    "convert_omniglot",
    "make_synthetic",
]
