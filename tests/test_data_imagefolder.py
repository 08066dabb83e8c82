"""Generic image-folder conversion: class-disjoint seeded splits, bytes kept, bad inputs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from metadist.data.ingest.convert import convert_imagefolder
from metadist.data.schema import Manifest
from metadist.data.store import ClassStore


def encode(rng: np.random.Generator, size: tuple[int, int], mode: str, fmt: str) -> bytes:
    shape = size if mode == "L" else (*size, 3)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def make_folder(
    root: Path,
    classes: int = 10,
    per_class: int = 4,
    mode: str = "L",
    fmt: str = "PNG",
    size: tuple[int, int] = (20, 20),
) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class{c:02d}"
        folder.mkdir(parents=True)
        for j in range(per_class):
            (folder / f"{j}.{fmt.lower()}").write_bytes(encode(rng, size, mode, fmt))
    return root


def splits_of(out: Path) -> dict[str, list[str]]:
    return {
        s: list(Manifest.load(out / s / "manifest.json").split_info.classes)
        for s in ("train", "val", "test")
        if (out / s).exists()
    }


def test_split_is_disjoint_complete_and_seeded(tmp_path: Path) -> None:
    src = make_folder(tmp_path / "src", classes=20)
    a = splits_of(convert_imagefolder(src, tmp_path / "a", seed=1))
    b = splits_of(convert_imagefolder(src, tmp_path / "b", seed=1))
    c = splits_of(convert_imagefolder(src, tmp_path / "c", seed=2))
    assert a == b and a != c
    assert [len(a[s]) for s in ("train", "val", "test")] == [13, 3, 4]
    names = [n for split in a.values() for n in split]
    assert sorted(names) == [f"class{i:02d}" for i in range(20)]  # disjoint and complete


def test_bytes_kept_and_info_recorded(tmp_path: Path) -> None:
    src = make_folder(tmp_path / "src", mode="RGB", fmt="JPEG", size=(30, 24))
    (src / "README.txt").write_text("not a class")  # top-level files are ignored
    (src / "class00" / "notes.txt").write_text("not an image")  # non-images are ignored
    out = convert_imagefolder(src, tmp_path / "out", val_fraction=0.0, name="toy")
    assert sorted(splits_of(out)) == ["test", "train"]
    m = Manifest.load(out / "train" / "manifest.json")
    assert m.dataset == "toy" and m.split_info.method == "seeded-fraction"
    assert (m.image.mode, m.image.shape) == ("RGB", (30, 24))
    assert (m.preprocessing.image_size, m.preprocessing.channels) == (24, 3)
    for row in pq.read_table(out / "train" / m.shards[0].file).column("image").to_pylist():
        assert row["bytes"] == (src / row["path"]).read_bytes()
    assert ClassStore(out / "train").load_class(0).shape == (4, 3, 24, 24)


def test_mixed_sizes_are_resized_on_load(tmp_path: Path) -> None:
    src = make_folder(tmp_path / "src", classes=3)
    (src / "class00" / "big.png").write_bytes(
        encode(np.random.default_rng(1), (40, 32), "L", "PNG")
    )
    out = convert_imagefolder(src, tmp_path / "out", val_fraction=0, test_fraction=0)
    assert Manifest.load(out / "train" / "manifest.json").image.shape is None
    store = ClassStore(out / "train", image_size=16)
    assert store.load_class(0).shape == (5, 1, 16, 16)


def test_bad_inputs(tmp_path: Path) -> None:
    src = make_folder(tmp_path / "src", classes=4)
    (src / "class01" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ValueError, match=f"{src / 'class01' / '2.png'}: not a decodable image"):
        convert_imagefolder(src, tmp_path / "out")
    (src / "class01" / "2.png").unlink()
    (src / "empty").mkdir()
    with pytest.raises(ValueError, match=f"{src / 'empty'}: class folder holds no image files"):
        convert_imagefolder(src, tmp_path / "out")
    (src / "empty").rmdir()
    with pytest.raises(ValueError, match="must not lie inside"):
        convert_imagefolder(src, src / "converted")
    with pytest.raises(ValueError, match="too few"):
        convert_imagefolder(src, tmp_path / "out", val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match=r"test_fraction must be in \[0, 1\)"):
        convert_imagefolder(src, tmp_path / "out", test_fraction=1.5)
    with pytest.raises(FileNotFoundError):
        convert_imagefolder(tmp_path / "nowhere", tmp_path / "out")
    assert not (tmp_path / "out").exists()
