"""ClassStore: manifest/shard agreement checks, tampered shards, loading, pickling."""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from metadist.data.ingest.synthetic import make_synthetic
from metadist.data.ingest.writer import sha256_file
from metadist.data.schema import SHARD_SCHEMA
from metadist.data.store import ClassStore

SHARD = "shard-00000.parquet"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("store") / "syn"
    return make_synthetic(
        out, classes=10, images_per_class=6, image_size=12, val_fraction=0.0, test_fraction=0.0
    )


@pytest.fixture()
def split(source: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the train split."""
    return Path(shutil.copytree(source / "train", tmp_path / "train"))


def edit_manifest(split: Path, change: Callable[[dict], None]) -> None:
    path = split / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def fix_sha(split: Path) -> None:
    def change(m: dict) -> None:
        m["shards"][0]["sha256"] = sha256_file(split / SHARD)

    edit_manifest(split, change)


def rewrite_shard(
    split: Path,
    change: Callable[[list[pa.Table]], list[pa.Table]],
    schema: pa.Schema = SHARD_SCHEMA,
) -> None:
    """Rewrite the shard group by group after ``change``; the manifest sha256 follows."""
    path = split / SHARD
    pf = pq.ParquetFile(path)
    groups = change([pf.read_row_group(i) for i in range(pf.num_row_groups)])
    pf.close()
    with pq.ParquetWriter(path, schema) as writer:
        for group in groups:
            writer.write_table(group, row_group_size=group.num_rows)
    fix_sha(split)


def test_store_basics(split: Path) -> None:
    store = ClassStore(split)
    assert store.num_classes == store.num_base_classes == 10
    assert store.class_size(3) == 6
    x = store.load_class(3)
    assert x.shape == (6, 1, 12, 12) and x.dtype == torch.uint8
    assert store.load_examples(3, [4, 1]).equal(x[[4, 1]])
    assert ClassStore(split, image_size=8, channels=3).load_class(3).shape == (6, 3, 8, 8)
    with pytest.raises(IndexError, match="class 10 out of range"):
        store.load_class(10)


def test_rotations_share_one_cache_entry(split: Path) -> None:
    edit_manifest(split, lambda m: m.update(rotations=[0, 90, 180, 270]))
    store = ClassStore(split)
    assert store.num_classes == 40
    assert store.class_names[10 + 2] == store.class_names[2] + "@rot90"
    assert store.base_class(32) == (2, 270)
    base = store.load_class(2)
    for r in (1, 2, 3):
        assert store.load_class(r * 10 + 2).equal(torch.rot90(base, r, dims=(2, 3)))
    assert list(store._cache) == [2]


def test_cache_bound(split: Path) -> None:
    store = ClassStore(split, max_cached_classes=2)
    first = store.load_class(0)
    for i in range(5):
        store.load_class(i)
    assert len(store._cache) == 2
    assert store.load_class(0).equal(first)
    uncached = ClassStore(split, max_cached_classes=0)
    assert uncached.load_class(0).equal(first) and not uncached._cache


def test_pickle_round_trip(split: Path) -> None:
    store = ClassStore(split)
    x = store.load_class(1)
    clone = pickle.loads(pickle.dumps(store))
    assert not clone._cache and not clone._files  # the cache and file handles stay home
    assert clone.load_class(1).equal(x)
    assert len(pickle.dumps(store)) < 20_000


def test_sha256_mismatch(split: Path) -> None:
    raw = bytearray((split / SHARD).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (split / SHARD).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"{split / SHARD}: sha256 .* does not match"):
        ClassStore(split)


def test_row_count_mismatch(split: Path) -> None:
    def change(m: dict) -> None:  # a self-consistent manifest that disagrees with the shard
        m["classes"][0]["count"] -= 1
        m["shards"][0]["rows"] -= 1

    edit_manifest(split, change)
    with pytest.raises(ValueError, match=f"{split / SHARD}: has 60 rows, .*says 59"):
        ClassStore(split)


def test_row_group_size_mismatch(split: Path) -> None:
    def change(groups: list[pa.Table]) -> list[pa.Table]:
        groups[1], groups[2] = (
            groups[1].slice(0, 5),
            pa.concat_tables([groups[2], groups[1].slice(5)]),
        )
        return groups

    rewrite_shard(split, change)
    with pytest.raises(ValueError, match="row group 1 .* has 5 rows, the manifest says count 6"):
        ClassStore(split)


def test_label_mismatch(split: Path) -> None:
    def change(groups: list[pa.Table]) -> list[pa.Table]:
        wrong = pa.array(["intruder"] * groups[0].num_rows, pa.string())
        groups[0] = groups[0].set_column(1, SHARD_SCHEMA.field("label"), wrong)
        return groups

    rewrite_shard(split, change)
    with pytest.raises(ValueError, match=r"row group 0 holds label \['intruder'\]"):
        ClassStore(split)


def test_schema_mismatch(split: Path) -> None:
    schema = SHARD_SCHEMA.append(pa.field("extra", pa.int64()))

    def change(groups: list[pa.Table]) -> list[pa.Table]:
        return [g.append_column("extra", pa.array([0] * g.num_rows, pa.int64())) for g in groups]

    rewrite_shard(split, change, schema)
    with pytest.raises(ValueError, match="schema does not match"):
        ClassStore(split)


def test_missing_and_unreadable_shard(split: Path) -> None:
    (split / SHARD).write_bytes(b"garbage")
    fix_sha(split)
    with pytest.raises(ValueError, match="not a readable parquet file"):
        ClassStore(split)
    (split / SHARD).unlink()
    with pytest.raises(ValueError, match=f"{split / SHARD}: shard listed in .* is missing"):
        ClassStore(split)


def test_corrupt_image_in_shard(split: Path) -> None:
    def change(groups: list[pa.Table]) -> list[pa.Table]:
        rows = groups[2].to_pylist()
        rows[4]["image"]["bytes"] = b"\x89PNG\r\n\x1a\n" + b"\0" * 20
        groups[2] = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
        return groups

    rewrite_shard(split, change)
    store = ClassStore(split)  # sha256 and structure agree: only decoding can tell
    label = store.class_names[2]
    store.load_class(1)
    with pytest.raises(ValueError, match=f"{split / SHARD}: class '{label}', row 4 of row group 2"):
        store.load_class(2)
    # Without verification, a shard changed after conversion fails at load time too.
    rewrite_shard(split, lambda groups: groups)
    edit_manifest(split, lambda m: m["shards"][0].update(sha256="0" * 64))
    with pytest.raises(ValueError, match="sha256"):
        ClassStore(split)
    with pytest.raises(ValueError, match="row 4 of row group 2"):
        ClassStore(split, verify=False).load_class(2)
