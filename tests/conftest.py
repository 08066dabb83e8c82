"""Shared test fixtures: the real data sets beside the repository, and small converted
copies of them made once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests share 2 cores with each other's Ray/MLflow processes; one thread avoids
# oversubscription (each small op otherwise waits on a spinning sibling thread).
torch.set_num_threads(1)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def real_data(*parts: str) -> Path:
    """A path under the real data directory; fails (never skips) when it is missing."""
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    path = Path(os.environ.get("METADIST_DATA_DIR") or default).joinpath(*parts)
    if not path.exists():
        pytest.fail(
            f"real test data not found: {path} does not exist. Set METADIST_DATA_DIR to the "
            "folder holding omniglot/ and miniimagenet/ (default <repo>/../shared/data).",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def omniglot_small(tmp_path_factory) -> Path:
    """Real Omniglot: the authors' minimal background set 1 (136 characters) for training
    and validation, the full evaluation set held out for testing, with rotations."""
    from metadist.data import convert_omniglot

    out = tmp_path_factory.mktemp("omniglot") / "omniglot-small1"
    return convert_omniglot(
        real_data("omniglot"), out, split="background-evaluation", background="small1",
        val_classes=20, seed=0,
    )
