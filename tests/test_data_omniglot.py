"""Omniglot conversion on the real release: splits, layout, reproducibility, bad inputs."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import real_data

from metadist.data.episodes import EpisodeSampler
from metadist.data.ingest.convert import convert_omniglot
from metadist.data.schema import DatasetInfo, Manifest
from metadist.data.store import ClassStore


def make_tiny_omniglot(
    dest: Path, *, background: int = 6, evaluation: int = 4, zipped: bool = False
) -> Path:
    """A few real characters in the release layout (folders, or zips when ``zipped``).

    The background characters come from the small1 set, renamed to images_background so
    the converter's defaults apply; they span at least two alphabets.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for zip_name, folder, count in (
        ("images_background_small1.zip", "images_background", background),
        ("images_evaluation.zip", "images_evaluation", evaluation),
    ):
        with zipfile.ZipFile(real_data("omniglot", zip_name)) as z:
            members = sorted(m for m in z.namelist() if m.endswith(".png"))
            characters = sorted({tuple(m.split("/")[1:3]) for m in members})
            step = len(characters) // count
            chosen = set(characters[::step][:count])
            out_zip = zipfile.ZipFile(dest / f"{folder}.zip", "w") if zipped else None
            for m in members:
                _, alphabet, character, file = m.split("/")
                if (alphabet, character) not in chosen:
                    continue
                name = f"{folder}/{alphabet}/{character}/{file}"
                if out_zip is not None:
                    out_zip.writestr(name, z.read(m))
                else:
                    (dest / name).parent.mkdir(parents=True, exist_ok=True)
                    (dest / name).write_bytes(z.read(m))
            if out_zip is not None:
                out_zip.close()
    return dest


def classes_of(out: Path, split: str) -> list[str]:
    return list(Manifest.load(out / split / "manifest.json").split_info.classes)


@pytest.fixture(scope="module")
def background_evaluation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("omniglot") / "be"
    return convert_omniglot(real_data("omniglot"), out, background="small1", val_classes=20)


@pytest.fixture(scope="module")
def finn_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("omniglot") / "finn"
    return convert_omniglot(real_data("omniglot"), out, split="1200-423", val_classes=100)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_omniglot(tmp_path_factory.mktemp("tiny-omniglot"))


def test_background_evaluation_split(background_evaluation: Path) -> None:
    out = background_evaluation
    train, val, test = (classes_of(out, s) for s in ("train", "val", "test"))
    assert len(train) + len(val) == 136  # the small1 background set
    assert len(val) == 20
    assert len(test) == 659  # the full evaluation set
    assert not (set(train) & set(val)) and not (set(train) | set(val)) & set(test)
    info = DatasetInfo.load(out / "dataset.json")
    assert info.splits == ("train", "val", "test")
    assert info.converter["args"]["background"] == "small1"
    for split in ("train", "val", "test"):
        m = Manifest.load(out / split / "manifest.json")
        assert m.dataset == "omniglot" and not m.synthetic
        assert m.split_info.method == "background-evaluation"
        assert m.rotations == (0, 90, 180, 270)  # every split, as Finn et al./learn2learn
        assert (m.image.mode, m.image.shape) == ("L", (105, 105))
        pre = m.preprocessing
        assert (pre.image_size, pre.channels, pre.invert, pre.mean, pre.std) == (
            28,
            1,
            True,
            (0.0,),
            (1.0,),
        )
        for c in m.classes:
            alphabet, character = c.label.split("/")
            assert c.group == alphabet and character.startswith("character")
            assert c.count == 20


def test_manifest_agrees_with_shards(background_evaluation: Path) -> None:
    m = Manifest.load(background_evaluation / "val" / "manifest.json")
    table = pq.read_table(background_evaluation / "val" / m.shards[0].file)
    assert table.num_rows == m.shards[0].rows == 20 * 20
    meta = pq.read_metadata(background_evaluation / "val" / m.shards[0].file)
    assert meta.num_row_groups == len(m.classes)
    paths = table.column("image").combine_chunks().field("path").to_pylist()
    assert all(p.startswith("images_background_small1/") for p in paths)
    # Stored bytes are the release's PNG files, unchanged.
    with zipfile.ZipFile(real_data("omniglot", "images_background_small1.zip")) as z:
        first = table.column("image")[0].as_py()
        assert first["bytes"] == z.read(first["path"])


def test_finn_1200_423_split(finn_split: Path) -> None:
    train, val, test = (classes_of(finn_split, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (1100, 100, 423)
    assert len(set(train) | set(val) | set(test)) == 1623
    # Both background and evaluation alphabets feed every split.
    store = ClassStore(finn_split / "test", verify=False)
    assert store.num_classes == 4 * 423
    assert Manifest.load(finn_split / "train" / "manifest.json").split_info.method == "1200-423"


def test_rotations_expand_classes(tiny: Path, tmp_path: Path) -> None:
    out = convert_omniglot(tiny, tmp_path / "o", val_classes=2)
    store = ClassStore(out / "train")
    base = store.num_base_classes
    assert store.num_classes == 4 * base
    assert store.class_names[base] == store.class_names[0] + "@rot90"
    x = store.load_class(0)
    assert x.shape == (20, 1, 28, 28) and x.dtype == torch.uint8
    for r in range(1, 4):
        assert store.load_class(r * base).equal(torch.rot90(x, r, dims=(-2, -1)))
    plain = convert_omniglot(tiny, tmp_path / "plain", val_classes=2, rotations=False)
    assert ClassStore(plain / "test").num_classes == 4  # evaluation characters only


def test_conversion_is_reproducible(tiny: Path, tmp_path: Path) -> None:
    a = convert_omniglot(tiny, tmp_path / "a", val_classes=2, seed=3)
    b = convert_omniglot(tiny, tmp_path / "b", val_classes=2, seed=3)
    for split in ("train", "val", "test"):
        ma = Manifest.load(a / split / "manifest.json")
        mb = Manifest.load(b / split / "manifest.json")
        assert ma.split_info == mb.split_info
        assert ma.shards == mb.shards  # byte-identical shards (same sha256)
    vals = {
        tuple(classes_of(convert_omniglot(tiny, tmp_path / f"s{s}", val_classes=2, seed=s), "val"))
        for s in range(6)
    }
    assert len(vals) > 1  # the seed does pick the validation characters


def test_zips_and_folders_give_the_same_dataset(tiny: Path, tmp_path: Path) -> None:
    zipped = make_tiny_omniglot(tmp_path / "zipped", zipped=True)
    a = convert_omniglot(tiny, tmp_path / "a", val_classes=1)
    b = convert_omniglot(zipped, tmp_path / "b", val_classes=1)
    for split in ("train", "val", "test"):
        assert (
            Manifest.load(a / split / "manifest.json").shards
            == Manifest.load(b / split / "manifest.json").shards
        )


def first_png(root: Path) -> Path:
    return min((root / "images_evaluation").rglob("*.png"))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_image_in_folder(tmp_path: Path, damage: str) -> None:
    src = make_tiny_omniglot(tmp_path / "src", background=2, evaluation=1)
    victim = first_png(src)
    data = victim.read_bytes()
    victim.write_bytes(
        {"garbage": b"not a png" * 10, "truncated": data[: len(data) // 2], "empty": b""}[damage]
    )
    with pytest.raises(ValueError, match=f"{victim}: not a decodable image"):
        convert_omniglot(src, tmp_path / "out", val_classes=0)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_corrupt_image_in_zip(tmp_path: Path) -> None:
    src = make_tiny_omniglot(tmp_path / "src", background=2, evaluation=1, zipped=True)
    path = src / "images_evaluation.zip"
    with zipfile.ZipFile(path) as z:
        members = sorted(n for n in z.namelist() if n.endswith(".png"))
        contents = {n: z.read(n) for n in members}
    contents[members[0]] = contents[members[0]][:40]
    with zipfile.ZipFile(path, "w") as z:
        for name, data in contents.items():
            z.writestr(name, data)
    with pytest.raises(ValueError, match=f"{path}:{members[0]}: not a decodable image"):
        convert_omniglot(src, tmp_path / "out", val_classes=0)
    assert not (tmp_path / "out").exists()


def test_damaged_zip_member_is_named(tmp_path: Path) -> None:
    src = make_tiny_omniglot(tmp_path / "src", background=2, evaluation=1, zipped=True)
    path = src / "images_evaluation.zip"
    with zipfile.ZipFile(path) as z:
        pngs = [i for i in z.infolist() if i.filename.endswith(".png")]
        info = min(pngs, key=lambda i: i.filename)
    raw = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 5
    raw[start] ^= 0xFF  # flips a data byte: the CRC check fails on read
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"{path}:{info.filename}"):
        convert_omniglot(src, tmp_path / "out", val_classes=0)
    assert not (tmp_path / "out").exists()


def test_missing_set_and_bad_arguments(tmp_path: Path, tiny: Path) -> None:
    with pytest.raises(FileNotFoundError, match="images_background"):
        convert_omniglot(tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="needs background='background'"):
        convert_omniglot(tiny, tmp_path / "out", split="1200-423", background="small1")
    with pytest.raises(ValueError, match="needs all 1623 characters, found 10"):
        convert_omniglot(tiny, tmp_path / "out", split="1200-423")
    with pytest.raises(ValueError, match="6 validation classes from a pool of 6"):
        convert_omniglot(tiny, tmp_path / "out", val_classes=6)
    with pytest.raises(ValueError, match="split must be one of"):
        convert_omniglot(tiny, tmp_path / "out", split="random")
    assert not (tmp_path / "out").exists()


def test_stray_file_location_is_refused(tmp_path: Path) -> None:
    src = make_tiny_omniglot(tmp_path / "src", background=2, evaluation=1)
    stray = src / "images_evaluation" / "stray.png"
    stray.write_bytes(first_png(src).read_bytes())
    with pytest.raises(ValueError, match=f"{stray}: unexpected location"):
        convert_omniglot(src, tmp_path / "out", val_classes=0)


def test_existing_output_refused_and_failed_overwrite_keeps_it(tmp_path: Path) -> None:
    src = make_tiny_omniglot(tmp_path / "src", background=2, evaluation=1)
    out = convert_omniglot(src, tmp_path / "out", val_classes=0)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match="already holds a dataset"):
        convert_omniglot(src, out, val_classes=1)
    first_png(src).write_bytes(b"broken")
    with pytest.raises(ValueError, match="not a decodable image"):
        convert_omniglot(src, out, val_classes=1, overwrite=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_episodes_on_real_omniglot(tiny: Path, tmp_path: Path) -> None:
    out = convert_omniglot(tiny, tmp_path / "o", val_classes=2)
    store = ClassStore(out / "train")
    sampler = EpisodeSampler(store, ways=5, shots=1, queries=5, seed=0)
    e = sampler.episode(0)
    assert e.support_x.shape == (5, 1, 28, 28) and e.query_x.shape == (25, 1, 28, 28)
    # Inverted as in Finn et al.: background 0.0, strokes near 1.0.
    x = torch.cat([e.support_x, e.query_x])
    assert x.min() >= 0.0 and x.max() > 0.9
    assert (x < 0.05).float().mean() > 0.6
