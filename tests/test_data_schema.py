"""Manifest and dataset.json validation: every malformed field is refused with its name."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from metadist.data.ingest.synthetic import make_synthetic
from metadist.data.schema import (
    SHARD_SCHEMA,
    DatasetInfo,
    Manifest,
    check_shard_name,
)
from metadist.data.store import ClassStore


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("schema") / "syn"
    return make_synthetic(out, classes=12, images_per_class=6, image_size=16)


@pytest.fixture()
def manifest_dict(dataset: Path) -> dict:
    return json.loads((dataset / "train" / "manifest.json").read_text())


def test_shard_schema_is_hf_image_compatible() -> None:
    image = SHARD_SCHEMA.field("image").type
    assert image == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert SHARD_SCHEMA.field("label").type == pa.string()
    assert SHARD_SCHEMA.field("group").nullable
    assert b"huggingface" in SHARD_SCHEMA.metadata


def test_written_shards_use_the_schema(dataset: Path) -> None:
    schema = pq.read_schema(dataset / "train" / "shard-00000.parquet")
    assert schema.equals(SHARD_SCHEMA, check_metadata=True)


def test_manifest_round_trip(dataset: Path, manifest_dict: dict) -> None:
    manifest = Manifest.load(dataset / "train" / "manifest.json")
    assert manifest.to_dict() == manifest_dict
    assert manifest.synthetic is True
    assert manifest.source.description.startswith("SYNTHETIC")
    assert list(manifest.split_info.classes) == [c.label for c in manifest.classes]
    info = DatasetInfo.load(dataset / "dataset.json")
    assert info.dataset == "synthetic"
    assert info.splits == ("train", "val", "test")
    assert info.converter["function"] == "metadist.data.ingest.synthetic.make_synthetic"


def _set(d: dict, path: str, value: object) -> None:
    *head, last = path.split(".")
    for key in head:
        d = d[int(key)] if isinstance(d, list) else d[key]
    if value is _DELETE:
        del d[last]
    else:
        d[int(last) if isinstance(d, list) else last] = value


_DELETE = object()

# (field path to corrupt, new value, field name expected in the error message)
BAD_FIELDS = [
    ("format_version", 2, "format_version"),
    ("format_version", True, "format_version"),
    ("dataset", "", "dataset"),
    ("dataset", _DELETE, "dataset"),
    ("split", "training", "split"),
    ("synthetic", "yes", "synthetic"),
    ("source.description", None, "source.description"),
    ("image.mode", "CMYK", "image.mode"),
    ("image.shape", [28], "image.shape"),
    ("preprocessing.image_size", 0, "preprocessing.image_size"),
    ("preprocessing.channels", 2, "preprocessing.channels"),
    ("preprocessing.invert", 1, "preprocessing.invert"),
    ("preprocessing.mean", [0.5, 0.5], "preprocessing.mean"),
    ("preprocessing.std", [0.0], "preprocessing.std"),
    ("preprocessing.std", ["a"], "preprocessing.std"),
    ("rotations", [45], "rotations"),
    ("rotations", [0, 0], "rotations"),
    ("rotations", [], "rotations"),
    ("split_info.method", 3, "split_info.method"),
    ("split_info.classes", ["x"], "split_info.classes"),
    ("classes.0.count", "6", "classes[0].count"),
    ("classes.0.count", 0, "classes[0].count"),
    ("classes.0.row_group", -1, "classes[0].row_group"),
    ("classes.0.label", 7, "classes[0].label"),
    ("classes.0.extra", 1, "classes[0].extra"),
    ("classes.0.shard", "shard-00009.parquet", "classes[0].shard"),
    ("classes.1.row_group", 0, "classes"),
    ("classes", [], "classes"),
    ("shards.0.rows", 5, "shards[0].rows"),
    ("shards.0.sha256", "abc", "shards[0].sha256"),
    ("shards.0.file", "shard-00000.txt", "shards[0].file"),
    ("unexpected", 1, "unexpected"),
]


@pytest.mark.parametrize(("field", "value", "named"), BAD_FIELDS)
def test_malformed_manifest_names_file_and_field(
    tmp_path: Path, manifest_dict: dict, field: str, value: object, named: str
) -> None:
    bad = copy.deepcopy(manifest_dict)
    _set(bad, field, value)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError) as info:
        Manifest.load(path)
    message = str(info.value)
    assert str(path) in message
    assert f"'{named}'" in message


def test_duplicate_label_is_refused(manifest_dict: dict) -> None:
    bad = copy.deepcopy(manifest_dict)
    bad["classes"][1]["label"] = bad["classes"][0]["label"]
    bad["split_info"]["classes"][1] = bad["classes"][0]["label"]
    with pytest.raises(ValueError, match="more than once"):
        Manifest.from_dict(bad, "m.json")


def test_invalid_json_names_file(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json: not valid JSON"):
        Manifest.load(path)


TRAVERSALS = [
    "../shard-00000.parquet",
    "../../etc/x.parquet",
    "/etc/x.parquet",
    "sub/shard-00000.parquet",
    "..\\shard-00000.parquet",
    "C:shard.parquet",
    "C:\\x\\shard.parquet",
    "..",
    "",
    "a\0b.parquet",
]


@pytest.mark.parametrize("name", TRAVERSALS)
def test_shard_name_path_traversal_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="shard file name"):
        check_shard_name(name)


@pytest.mark.parametrize("name", ["../shard-00000.parquet", "/tmp/shard-00000.parquet"])
def test_store_refuses_traversal_in_manifest(
    tmp_path: Path, dataset: Path, manifest_dict: dict, name: str
) -> None:
    # A shard that really exists outside the split dir must still never be opened.
    split = tmp_path / "train"
    split.mkdir()
    (tmp_path / "shard-00000.parquet").write_bytes(
        (dataset / "train" / "shard-00000.parquet").read_bytes()
    )
    bad = copy.deepcopy(manifest_dict)
    for entry in bad["classes"]:
        entry["shard"] = name
    bad["shards"][0]["file"] = name
    (split / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="not a plain file name") as info:
        ClassStore(split)
    assert "shards[0].file" in str(info.value)


def test_dataset_info_validation(tmp_path: Path, dataset: Path) -> None:
    good = json.loads((dataset / "dataset.json").read_text())
    for field, value in [("splits", ["train", "train"]), ("splits", ["dev"]), ("converter", {})]:
        bad = copy.deepcopy(good)
        bad[field] = value
        path = tmp_path / "dataset.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=f"dataset.json: field '{field}"):
            DatasetInfo.load(path)
