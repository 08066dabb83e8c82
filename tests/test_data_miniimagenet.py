"""miniImageNet conversion: a small real layout for the fast tests, the full set as slow."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import real_data
from mini_subset import CLASSES, PER_CLASS, make_small_mini, read_rows, write_csv

from metadist.data.ingest.convert import convert_miniimagenet
from metadist.data.schema import Manifest
from metadist.data.store import ClassStore


def test_small_round_trip(mini_small_src: Path, mini_small: Path) -> None:
    seen: set[str] = set()
    for split, n in CLASSES.items():
        m = Manifest.load(mini_small / split / "manifest.json")
        labels = set(m.split_info.classes)
        assert len(labels) == n and not labels & seen
        seen |= labels
        assert m.split_info.method == "csv" and m.split_info.seed is None
        assert (m.image.mode, m.image.shape) == ("RGB", (84, 84))
        assert m.rotations == (0,)
        assert m.preprocessing.channels == 3 and m.preprocessing.image_size == 84
        assert [c.count for c in m.classes] == [PER_CLASS] * n
        # JPEG bytes stored as they are, in CSV order within each class.
        table = pq.read_table(mini_small / split / m.shards[0].file)
        rows = read_rows(mini_small_src / f"{split}.csv")
        expected = [f for f, _ in sorted(rows, key=lambda r: r[1])]
        stored = table.column("image").to_pylist()
        assert [r["path"] for r in stored] == [f"images/{f}" for f in expected]
        assert all(r["bytes"] == (mini_small_src / r["path"]).read_bytes() for r in stored)
    store = ClassStore(mini_small / "train")
    x = store.load_class(0)
    assert x.shape == (PER_CLASS, 3, 84, 84) and x.dtype == torch.uint8


def test_zip_source_gives_same_dataset(tmp_path: Path, mini_small: Path) -> None:
    src = make_small_mini(tmp_path / "src", zipped=True)
    out = convert_miniimagenet(src, tmp_path / "out")
    for split in CLASSES:
        a = Manifest.load(out / split / "manifest.json")
        b = Manifest.load(mini_small / split / "manifest.json")
        assert a.classes == b.classes and a.shards == b.shards


def copy_layout(src: Path, dest: Path) -> Path:
    dest.mkdir()
    (dest / "images").mkdir()
    for p in src.rglob("*"):
        if p.is_file():
            (dest / p.relative_to(src)).write_bytes(p.read_bytes())
    return dest


def test_missing_image_names_csv_line_and_file(tmp_path: Path, mini_small_src: Path) -> None:
    src = copy_layout(mini_small_src, tmp_path / "src")
    filename = read_rows(src / "val.csv")[4][0]
    (src / "images" / filename).unlink()
    with pytest.raises(ValueError, match=f"{src / 'val.csv'}:6: image '{filename}' not found"):
        convert_miniimagenet(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupt_jpeg_is_named(tmp_path: Path, mini_small_src: Path) -> None:
    src = copy_layout(mini_small_src, tmp_path / "src")
    victim = src / "images" / read_rows(src / "test.csv")[7][0]
    victim.write_bytes(victim.read_bytes()[:300])
    with pytest.raises(ValueError, match=f"{victim}: not a decodable image"):
        convert_miniimagenet(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_csvs(tmp_path: Path, mini_small_src: Path) -> None:
    src = copy_layout(mini_small_src, tmp_path / "src")
    train = read_rows(src / "train.csv")
    (src / "train.csv").write_text("file,class\n")
    with pytest.raises(ValueError, match="train.csv:1: expected the header"):
        convert_miniimagenet(src, tmp_path / "out")
    write_csv(src / "train.csv", [*train, train[0]])
    with pytest.raises(ValueError, match=f"train.csv:{len(train) + 2}: image .* already listed"):
        convert_miniimagenet(src, tmp_path / "out")
    write_csv(src / "train.csv", train)
    val = read_rows(src / "val.csv")
    write_csv(src / "val.csv", [(f, train[0][1]) for f, _ in val])
    with pytest.raises(ValueError, match=f"class '{train[0][1]}' appears in both .*train.csv"):
        convert_miniimagenet(src, tmp_path / "out")
    write_csv(src / "val.csv", val)
    write_csv(src / "train.csv", [("../x.jpg", "n1")])
    with pytest.raises(ValueError, match="must be a plain file name"):
        convert_miniimagenet(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_full_miniimagenet(tmp_path: Path) -> None:
    out = convert_miniimagenet(real_data("miniimagenet"), tmp_path / "mini")
    seen: set[str] = set()
    for split, n in {"train": 64, "val": 16, "test": 20}.items():
        m = Manifest.load(out / split / "manifest.json")
        assert len(m.classes) == n and all(c.count == 600 for c in m.classes)
        assert not set(m.split_info.classes) & seen
        seen |= set(m.split_info.classes)
        store = ClassStore(out / split)
        assert store.load_class(n - 1).shape == (600, 3, 84, 84)
