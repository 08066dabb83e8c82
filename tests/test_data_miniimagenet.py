"""miniImageNet conversion: a small real layout for the fast tests, the full set as slow."""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import real_data

from metadist.data.ingest.convert import convert_miniimagenet
from metadist.data.schema import Manifest
from metadist.data.store import ClassStore

PER_CLASS = 30
CLASSES = {"train": 4, "val": 2, "test": 3}


def read_rows(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="") as f:
        return [(r["filename"], r["label"]) for r in csv.DictReader(f)]


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "label"])
        writer.writerows(rows)


def make_small_mini(dest: Path, *, zipped: bool = False) -> Path:
    """A few real classes x PER_CLASS real images in the standard layout."""
    dest.mkdir(parents=True)
    chosen: dict[str, list[tuple[str, str]]] = {}
    for split, n in CLASSES.items():
        rows = read_rows(real_data("miniimagenet", f"{split}.csv"))
        labels = sorted({label for _, label in rows})[:n]
        chosen[split] = [r for lab in labels for r in [x for x in rows if x[1] == lab][:PER_CLASS]]
        write_csv(dest / f"{split}.csv", chosen[split])
    with zipfile.ZipFile(real_data("miniimagenet", "images.zip")) as z:
        images = {f"images/{f}": z.read(f"images/{f}") for rows in chosen.values() for f, _ in rows}
    if zipped:
        with zipfile.ZipFile(dest / "images.zip", "w") as z:
            for name, data in images.items():
                z.writestr(name, data)
    else:
        (dest / "images").mkdir()
        for name, data in images.items():
            (dest / name).write_bytes(data)
    return dest


@pytest.fixture(scope="module")
def small_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_small_mini(tmp_path_factory.mktemp("mini") / "src")


@pytest.fixture(scope="module")
def small_out(small_src: Path) -> Path:
    return convert_miniimagenet(small_src, small_src.parent / "out")


def test_small_round_trip(small_src: Path, small_out: Path) -> None:
    seen: set[str] = set()
    for split, n in CLASSES.items():
        m = Manifest.load(small_out / split / "manifest.json")
        labels = set(m.split_info.classes)
        assert len(labels) == n and not labels & seen
        seen |= labels
        assert m.split_info.method == "csv" and m.split_info.seed is None
        assert (m.image.mode, m.image.shape) == ("RGB", (84, 84))
        assert m.rotations == (0,)
        assert m.preprocessing.channels == 3 and m.preprocessing.image_size == 84
        assert [c.count for c in m.classes] == [PER_CLASS] * n
        # JPEG bytes stored as they are, in CSV order within each class.
        table = pq.read_table(small_out / split / m.shards[0].file)
        expected = [f for f, _ in sorted(read_rows(small_src / f"{split}.csv"), key=lambda r: r[1])]
        stored = table.column("image").to_pylist()
        assert [r["path"] for r in stored] == [f"images/{f}" for f in expected]
        assert all(r["bytes"] == (small_src / r["path"]).read_bytes() for r in stored)
    store = ClassStore(small_out / "train")
    x = store.load_class(0)
    assert x.shape == (PER_CLASS, 3, 84, 84) and x.dtype == torch.uint8


def test_zip_source_gives_same_dataset(tmp_path: Path, small_out: Path) -> None:
    src = make_small_mini(tmp_path / "src", zipped=True)
    out = convert_miniimagenet(src, tmp_path / "out")
    for split in CLASSES:
        a = Manifest.load(out / split / "manifest.json")
        b = Manifest.load(small_out / split / "manifest.json")
        assert a.classes == b.classes and a.shards == b.shards


def copy_layout(src: Path, dest: Path) -> Path:
    dest.mkdir()
    (dest / "images").mkdir()
    for p in src.rglob("*"):
        if p.is_file():
            (dest / p.relative_to(src)).write_bytes(p.read_bytes())
    return dest


def test_missing_image_names_csv_line_and_file(tmp_path: Path, small_src: Path) -> None:
    src = copy_layout(small_src, tmp_path / "src")
    filename = read_rows(src / "val.csv")[4][0]
    (src / "images" / filename).unlink()
    with pytest.raises(ValueError, match=f"{src / 'val.csv'}:6: image '{filename}' not found"):
        convert_miniimagenet(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupt_jpeg_is_named(tmp_path: Path, small_src: Path) -> None:
    src = copy_layout(small_src, tmp_path / "src")
    victim = src / "images" / read_rows(src / "test.csv")[7][0]
    victim.write_bytes(victim.read_bytes()[:300])
    with pytest.raises(ValueError, match=f"{victim}: not a decodable image"):
        convert_miniimagenet(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_csvs(tmp_path: Path, small_src: Path) -> None:
    src = copy_layout(small_src, tmp_path / "src")
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
