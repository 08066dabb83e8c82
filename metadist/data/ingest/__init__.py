"""Raw dataset layouts -> metadist's Parquet episode store: Omniglot's release, the
miniImageNet images/ + CSV split, an ImageFolder tree, and generated synthetic data.

Offline conversion only: nothing on the per-episode read path (``metadist.data``)
imports this package.
"""

from metadist.data.ingest.convert import (
    convert_imagefolder,
    convert_miniimagenet,
    convert_omniglot,
)
from metadist.data.ingest.synthetic import make_synthetic

__all__ = ["convert_imagefolder", "convert_miniimagenet", "convert_omniglot", "make_synthetic"]
