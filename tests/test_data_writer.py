"""Atomic dataset writing: refusals, overwrite, failure leaves everything as it was."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from metadist.data.ingest.synthetic import make_synthetic
from metadist.data.ingest.writer import ClassData, SplitData, write_dataset
from metadist.data.schema import ImageInfo, Manifest, PreprocessingInfo, SourceInfo
from metadist.data.store import ClassStore

CONVERTER = {"function": "tests.hand_written", "args": {}}


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def small(out: Path, **kwargs: object) -> Path:
    return make_synthetic(out, classes=8, images_per_class=4, image_size=8, **kwargs)


def test_layout(tmp_path: Path) -> None:
    out = small(tmp_path / "ds")
    assert (out / "dataset.json").is_file()
    for split in ("train", "val", "test"):
        assert (out / split / "manifest.json").is_file()
        assert (out / split / "shard-00000.parquet").is_file()
    assert leftovers(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    # Published with the usual permissions, not the 0700 of a private temp dir.
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


def test_existing_dataset_is_refused_and_untouched(tmp_path: Path) -> None:
    out = small(tmp_path / "ds")
    before = snapshot(out)
    with pytest.raises(FileExistsError, match=f"{out}.*already holds a dataset"):
        small(out, seed=1)
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []


def test_overwrite_replaces_dataset(tmp_path: Path) -> None:
    out = small(tmp_path / "ds")
    before = snapshot(out)
    small(out, seed=1, overwrite=True)
    assert snapshot(out) != before
    assert Manifest.load(out / "train" / "manifest.json").split_info.seed == 1
    assert leftovers(tmp_path) == []


def test_failed_overwrite_keeps_old_dataset(tmp_path: Path) -> None:
    out = small(tmp_path / "ds")
    before = snapshot(out)
    calls = 0

    def read(path: str) -> bytes:
        nonlocal calls
        calls += 1
        if calls > 3:
            raise ValueError(f"{path}: simulated failure halfway through")
        return (out / "train" / "shard-00000.parquet").read_bytes()[:10]

    data = SplitData(
        classes=[ClassData(f"c{i}", None, ["a", "b"], read) for i in range(4)],
        source=SourceInfo("test"),
        image=ImageInfo("L", (8, 8)),
        preprocessing=PreprocessingInfo(8, 1, False, (0.0,), (1.0,)),
        rotations=(0,),
        method="test",
        seed=None,
    )
    with pytest.raises(ValueError, match="simulated failure"):
        write_dataset(out, {"train": data}, dataset="x", converter=CONVERTER, overwrite=True)
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []


def test_non_dataset_directory_is_never_written(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="does not hold a metadist dataset"):
            small(out, overwrite=overwrite)
    assert snapshot(out) == {"notes.txt": hashlib.sha256(b"precious").hexdigest()}
    assert leftovers(tmp_path) == []


def test_dataset_with_foreign_files_is_not_overwritten(tmp_path: Path) -> None:
    out = small(tmp_path / "ds")
    (out / "train" / "my-notes.txt").write_text("keep me")
    before = snapshot(out)
    with pytest.raises(FileExistsError, match="train/my-notes.txt"):
        small(out, overwrite=True)
    assert snapshot(out) == before


def test_output_is_a_file(tmp_path: Path) -> None:
    out = tmp_path / "file"
    out.write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        small(out, overwrite=True)
    assert out.read_text() == "x"


def test_empty_directory_is_filled(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    small(out)
    assert (out / "dataset.json").is_file()


def test_shards_roll_over_and_keep_one_row_group_per_class(tmp_path: Path) -> None:
    out = make_synthetic(
        tmp_path / "ds",
        classes=10,
        images_per_class=5,
        image_size=8,
        test_fraction=0.0,
        val_fraction=0.0,
    )
    one_shard = Manifest.load(out / "train" / "manifest.json")
    assert len(one_shard.shards) == 1
    # Rewrite with a tiny shard budget: every class should land in its own shard.
    classes = one_shard.classes
    store = ClassStore(out / "train")
    images = {c.label: store.load_class(i) for i, c in enumerate(classes)}
    rows = pq.read_table(out / "train" / "shard-00000.parquet").to_pylist()
    blobs = {r["image"]["path"]: r["image"]["bytes"] for r in rows}
    data = SplitData(
        classes=[
            ClassData(
                c.label,
                None,
                [r["image"]["path"] for r in rows if r["label"] == c.label],
                blobs.__getitem__,
            )
            for c in classes
        ],
        source=SourceInfo("test"),
        image=ImageInfo("L", (8, 8)),
        preprocessing=PreprocessingInfo(8, 1, False, (0.0,), (1.0,)),
        rotations=(0,),
        method="test",
        seed=None,
    )
    smallest = min(len(b) for b in blobs.values()) * 5
    out2 = write_dataset(
        tmp_path / "ds2", {"train": data}, dataset="x", converter=CONVERTER, shard_bytes=smallest
    )
    manifest = Manifest.load(out2 / "train" / "manifest.json")
    assert len(manifest.shards) > 1
    for shard in manifest.shards:
        meta = pq.read_metadata(out2 / "train" / shard.file)
        members = [c for c in manifest.classes if c.shard == shard.file]
        assert meta.num_row_groups == len(members)
        assert meta.num_rows == shard.rows
    store2 = ClassStore(out2 / "train")
    for i, c in enumerate(manifest.classes):
        assert store2.load_class(i).equal(images[c.label])


def test_class_in_two_splits_is_refused(tmp_path: Path) -> None:
    cls = ClassData("same", None, ["p"], lambda p: b"")
    data = SplitData(
        [cls],
        SourceInfo("t"),
        ImageInfo("L", None),
        PreprocessingInfo(8, 1, False, (0.0,), (1.0,)),
        (0,),
        "t",
        None,
    )
    with pytest.raises(ValueError, match="'same' is in both the train and the test split"):
        write_dataset(
            tmp_path / "x", {"train": data, "test": data}, dataset="x", converter=CONVERTER
        )
    assert not (tmp_path / "x").exists()
