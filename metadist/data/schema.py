"""On-disk format of a converted few-shot dataset: the shard schema and the manifests.

Layout::

    <out>/dataset.json                  DatasetInfo: splits present, converter and its args
    <out>/<split>/manifest.json         Manifest of the split (train, val or test)
    <out>/<split>/shard-00000.parquet   rows of SHARD_SCHEMA, one row group per class
    <out>/<split>/shard-00001.parquet   (a new shard starts before one would pass ~256 MB)

Shard rows (``SHARD_SCHEMA``, readable by Hugging Face ``datasets`` as an Image feature)::

    image: struct<bytes: binary, path: string>   original encoded file, its source path
    label: string                                class name
    group: string (nullable)                     e.g. the Omniglot alphabet

A class's rows form exactly one row group, so an episode reads only its classes' groups.

manifest.json (example: Omniglot train)::

    {
     "format_version": 1,
     "dataset": "omniglot",
     "split": "train",
     "source": {"description": "Omniglot (Lake et al. 2015): ...", "path": "/data/omniglot"},
     "synthetic": false,
     "image": {"mode": "L", "shape": [105, 105]},        # decoded mode, stored [H, W] or null
     "preprocessing": {"image_size": 28, "channels": 1, "invert": true,
                       "mean": [0.0], "std": [1.0]},      # recommended defaults
     "rotations": [0, 90, 180, 270],     # at sampling time; (class, rotation) = a class
     "split_info": {"method": "1200-423", "seed": 0, "classes": ["Alphabet/character01", ...]},
     "classes": [{"label": "Alphabet/character01", "group": "Alphabet", "count": 20,
                  "shard": "shard-00000.parquet", "row_group": 0}, ...],
     "shards": [{"file": "shard-00000.parquet", "rows": 22000, "sha256": "..."}]
    }

Manifests are read back from disk and may have been edited by hand or tampered with, so
every loader here validates types and cross-field consistency and raises ``ValueError``
naming the file and the field. Shard names in particular are checked to be plain file
names, so a manifest can never make a reader open a path outside its split directory.

``load`` reads from a local path or an object-store URI (``s3://...``, see ``location``);
``save`` writes local files only (converters build datasets locally; upload them after).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import pyarrow as pa

from metadist.data.location import Location

# Few-shot images are resized to tens of pixels (28, 84); a size this large is a mistake
# (or a hostile manifest) that would allocate gigabytes per episode.
MAX_IMAGE_SIZE = 1024

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
MANIFEST_NAME = "manifest.json"
DATASET_INFO_NAME = "dataset.json"
VALID_ROTATIONS = (0, 90, 180, 270)
# Image mode the stored images decode to -> number of channels.
IMAGE_MODES = {"L": 1, "RGB": 3}

# The Hugging Face `datasets` metadata makes `load_dataset("parquet", ...)` decode the
# image column as an Image feature; the struct layout below is that feature's storage.
_HF_FEATURES = {
    "info": {
        "features": {
            "image": {"_type": "Image"},
            "label": {"dtype": "string", "_type": "Value"},
            "group": {"dtype": "string", "_type": "Value"},
        }
    }
}
IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
SHARD_SCHEMA = pa.schema(
    [
        pa.field("image", IMAGE_TYPE, nullable=False),  # encoded file bytes + source path
        pa.field("label", pa.string(), nullable=False),  # class name
        pa.field("group", pa.string(), nullable=True),  # e.g. Omniglot alphabet
    ],
    metadata={b"huggingface": json.dumps(_HF_FEATURES).encode()},
)

_SHA256 = re.compile(r"[0-9a-f]{64}")


def shard_file_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def check_shard_name(name: object, where: str = "shard") -> str:
    """Return ``name`` if it is a plain file name inside the split directory.

    Raises ``ValueError`` for anything that could point elsewhere: absolute paths, drive
    letters, URI schemes, path separators, ``.``/``..``, NUL bytes. The split directory
    may be an object-store URI (``s3://...``); a shard name is always relative to it.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: shard file name must be a non-empty string, got {name!r}")
    if (
        "/" in name
        or "\\" in name
        or "\0" in name
        or ":" in name  # a drive letter or a scheme (s3:, file:)
        or name in (".", "..")
        or PurePosixPath(name).is_absolute()
        or PureWindowsPath(name).is_absolute()
        or PureWindowsPath(name).drive
    ):
        raise ValueError(
            f"{where}: shard file name {name!r} is not a plain file name inside the split "
            "directory (absolute paths, URIs, '..' and path separators are refused)"
        )
    if not name.endswith(".parquet"):
        raise ValueError(f"{where}: shard file name {name!r} must end with .parquet")
    return name


# --- typed field readers: each raises ValueError("<file>: field '<path>': ...") ---------


class _Fields:
    """Reads one JSON object, naming the file and the dotted field path in every error."""

    def __init__(self, data: object, where: str, prefix: str = "") -> None:
        self.where = where
        self.prefix = prefix
        if not isinstance(data, dict):
            raise self.error("", f"expected an object, got {type(data).__name__}")
        self.data: dict[str, Any] = data

    def _name(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix and key else (self.prefix or key)

    def error(self, key: str, message: str) -> ValueError:
        name = self._name(key)
        return ValueError(
            f"{self.where}: field '{name}': {message}" if name else f"{self.where}: {message}"
        )

    def check_keys(self, allowed: Sequence[str]) -> None:
        missing = [k for k in allowed if k not in self.data]
        if missing:
            raise self.error(missing[0], "missing")
        unknown = sorted(set(self.data) - set(allowed))
        if unknown:
            raise self.error(unknown[0], "unknown field")

    def sub(self, key: str) -> _Fields:
        return _Fields(self.data.get(key), self.where, self._name(key))

    def str_(self, key: str, *, optional: bool = False) -> str | None:
        value = self.data.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            raise self.error(key, f"expected a non-empty string, got {value!r}")
        return value

    def int_(self, key: str, *, minimum: int | None = None, maximum: int | None = None,
             optional: bool = False) -> int | None:
        value = self.data.get(key)
        if value is None and optional:
            return None
        # bool is an int subclass; `true` is never a valid count.
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.error(key, f"expected an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"expected an integer >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.error(key, f"expected an integer <= {maximum}, got {value}")
        return value

    def bool_(self, key: str) -> bool:
        value = self.data.get(key)
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {value!r}")
        return value

    def list_(self, key: str) -> list[Any]:
        value = self.data.get(key)
        if not isinstance(value, list):
            raise self.error(key, f"expected a list, got {value!r}")
        return value

    def floats(self, key: str) -> tuple[float, ...]:
        values = self.list_(key)
        for v in values:
            if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
                raise self.error(key, f"expected finite numbers, got {v!r}")
        return tuple(float(v) for v in values)


# --- manifest ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceInfo:
    description: str
    path: str | None = None


@dataclass(frozen=True)
class ImageInfo:
    mode: str  # "L" or "RGB": what the stored images are decoded to
    shape: tuple[int, int] | None  # [H, W] of the stored images; None when sizes vary


@dataclass(frozen=True)
class PreprocessingInfo:
    """Recommended defaults; a training run may override any of them."""

    image_size: int
    channels: int
    invert: bool  # 1 - x after scaling to [0, 1] (Omniglot: strokes become 1.0)
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class SplitInfo:
    method: str  # "background-evaluation", "1200-423", "csv", "seeded-fraction"
    seed: int | None
    classes: tuple[str, ...]  # every class of this split, in manifest order


@dataclass(frozen=True)
class ClassEntry:
    label: str
    group: str | None
    count: int
    shard: str
    row_group: int


@dataclass(frozen=True)
class ShardEntry:
    file: str
    rows: int
    sha256: str


_MANIFEST_KEYS = (
    "format_version",
    "dataset",
    "split",
    "source",
    "synthetic",
    "image",
    "preprocessing",
    "rotations",
    "split_info",
    "classes",
    "shards",
)


@dataclass(frozen=True)
class Manifest:
    """Everything needed to read one split and to check it against its shards."""

    dataset: str
    split: str
    source: SourceInfo
    synthetic: bool
    image: ImageInfo
    preprocessing: PreprocessingInfo
    rotations: tuple[int, ...]  # applied at sampling time; each (class, rotation) is a class
    split_info: SplitInfo
    classes: tuple[ClassEntry, ...]
    shards: tuple[ShardEntry, ...]
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        pre = self.preprocessing
        return {
            "format_version": self.format_version,
            "dataset": self.dataset,
            "split": self.split,
            "source": {"description": self.source.description, "path": self.source.path},
            "synthetic": self.synthetic,
            "image": {
                "mode": self.image.mode,
                "shape": None if self.image.shape is None else list(self.image.shape),
            },
            "preprocessing": {
                "image_size": pre.image_size,
                "channels": pre.channels,
                "invert": pre.invert,
                "mean": list(pre.mean),
                "std": list(pre.std),
            },
            "rotations": list(self.rotations),
            "split_info": {
                "method": self.split_info.method,
                "seed": self.split_info.seed,
                "classes": list(self.split_info.classes),
            },
            "classes": [
                {
                    "label": c.label,
                    "group": c.group,
                    "count": c.count,
                    "shard": c.shard,
                    "row_group": c.row_group,
                }
                for c in self.classes
            ],
            "shards": [{"file": s.file, "rows": s.rows, "sha256": s.sha256} for s in self.shards],
        }

    @classmethod
    def from_dict(cls, data: object, where: str = "manifest") -> Manifest:
        """Build and validate a manifest; ``where`` names the source in error messages."""
        top = _Fields(data, where)
        top.check_keys(_MANIFEST_KEYS)
        version = top.int_("format_version")
        if version != FORMAT_VERSION:
            raise top.error(
                "format_version",
                f"unsupported version {version} (this reader knows {FORMAT_VERSION})",
            )
        split = top.str_("split")
        if split not in SPLITS:
            raise top.error("split", f"expected one of {list(SPLITS)}, got {split!r}")

        src = top.sub("source")
        src.check_keys(("description", "path"))
        source = SourceInfo(src.str_("description"), src.str_("path", optional=True))

        img = top.sub("image")
        img.check_keys(("mode", "shape"))
        mode = img.str_("mode")
        if mode not in IMAGE_MODES:
            raise img.error("mode", f"expected one of {list(IMAGE_MODES)}, got {mode!r}")
        shape: tuple[int, int] | None = None
        if img.data["shape"] is not None:
            dims = img.list_("shape")
            if len(dims) != 2 or not all(
                isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims
            ):
                raise img.error("shape", f"expected [height, width] or null, got {dims!r}")
            shape = (dims[0], dims[1])

        pre_f = top.sub("preprocessing")
        pre_f.check_keys(("image_size", "channels", "invert", "mean", "std"))
        channels = pre_f.int_("channels")
        if channels not in (1, 3):
            raise pre_f.error("channels", f"expected 1 or 3, got {channels}")
        pre = PreprocessingInfo(
            image_size=pre_f.int_("image_size", minimum=1, maximum=MAX_IMAGE_SIZE),
            channels=channels,
            invert=pre_f.bool_("invert"),
            mean=pre_f.floats("mean"),
            std=pre_f.floats("std"),
        )
        for key, values in (("mean", pre.mean), ("std", pre.std)):
            if len(values) != channels:
                raise pre_f.error(
                    key, f"expected {channels} values (one per channel), got {len(values)}"
                )
        if any(s <= 0 for s in pre.std):
            raise pre_f.error("std", f"expected positive values, got {list(pre.std)}")

        rotations = top.list_("rotations")
        if (
            not rotations
            or any(
                not isinstance(r, int) or isinstance(r, bool) or r not in VALID_ROTATIONS
                for r in rotations
            )
            or len(set(rotations)) != len(rotations)
        ):
            raise top.error(
                "rotations",
                f"expected distinct values from {list(VALID_ROTATIONS)}, got {rotations!r}",
            )

        si = top.sub("split_info")
        si.check_keys(("method", "seed", "classes"))
        split_classes = si.list_("classes")
        if not all(isinstance(c, str) and c for c in split_classes):
            raise si.error("classes", "expected a list of non-empty strings")
        split_info = SplitInfo(
            si.str_("method"), si.int_("seed", optional=True), tuple(split_classes)
        )

        shards: list[ShardEntry] = []
        for i, raw in enumerate(top.list_("shards")):
            f = _Fields(raw, where, f"shards[{i}]")
            f.check_keys(("file", "rows", "sha256"))
            name = check_shard_name(f.data["file"], f"{where}: field 'shards[{i}].file'")
            digest = f.str_("sha256")
            if not _SHA256.fullmatch(digest):
                raise f.error("sha256", f"expected 64 lowercase hex digits, got {digest!r}")
            shards.append(ShardEntry(name, f.int_("rows", minimum=0), digest))

        classes: list[ClassEntry] = []
        for i, raw in enumerate(top.list_("classes")):
            f = _Fields(raw, where, f"classes[{i}]")
            f.check_keys(("label", "group", "count", "shard", "row_group"))
            shard = check_shard_name(f.data["shard"], f"{where}: field 'classes[{i}].shard'")
            classes.append(
                ClassEntry(
                    label=f.str_("label"),
                    group=f.str_("group", optional=True),
                    count=f.int_("count", minimum=1),
                    shard=shard,
                    row_group=f.int_("row_group", minimum=0),
                )
            )

        manifest = cls(
            dataset=top.str_("dataset"),
            split=split,
            source=source,
            synthetic=top.bool_("synthetic"),
            image=ImageInfo(mode, shape),
            preprocessing=pre,
            rotations=tuple(rotations),
            split_info=split_info,
            classes=tuple(classes),
            shards=tuple(shards),
            format_version=version,
        )
        manifest._check_consistency(where)
        return manifest

    def _check_consistency(self, where: str) -> None:
        def fail(field: str, message: str) -> ValueError:
            return ValueError(f"{where}: field '{field}': {message}")

        if not self.classes:
            raise fail("classes", "a split needs at least one class")
        labels = [c.label for c in self.classes]
        if len(set(labels)) != len(labels):
            dup = next(lab for lab in labels if labels.count(lab) > 1)
            raise fail("classes", f"label {dup!r} appears more than once")
        if list(self.split_info.classes) != labels:
            raise fail("split_info.classes", "must list the labels of 'classes', in order")

        files = [s.file for s in self.shards]
        if len(set(files)) != len(files):
            raise fail("shards", "a shard file is listed more than once")
        by_shard: dict[str, list[ClassEntry]] = {f: [] for f in files}
        for i, c in enumerate(self.classes):
            if c.shard not in by_shard:
                raise fail(f"classes[{i}].shard", f"{c.shard!r} is not listed in 'shards'")
            by_shard[c.shard].append(c)
        for i, s in enumerate(self.shards):
            members = by_shard[s.file]
            if sum(c.count for c in members) != s.rows:
                raise fail(
                    f"shards[{i}].rows",
                    f"{s.rows} rows, but the classes stored in "
                    f"{s.file} count {sum(c.count for c in members)}",
                )
            if sorted(c.row_group for c in members) != list(range(len(members))):
                raise fail(
                    "classes",
                    f"row groups of {s.file} must be 0..{len(members) - 1}, "
                    "each used by exactly one class",
                )

    def save(self, path: str | Path) -> None:
        path = Path(path)
        # Round-trip through the validator so a writer bug can never produce a manifest
        # that the reader refuses later.
        Manifest.from_dict(self.to_dict(), str(path))
        path.write_text(dumps_json(self.to_dict()), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path | Location) -> Manifest:
        """Read and validate ``path``: a local path, a URI (``s3://...``) or a Location."""
        location = Location.of(path)
        return cls.from_dict(_read_json(location), str(location))


# --- dataset.json -----------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetInfo:
    dataset: str
    splits: tuple[str, ...]
    converter: Mapping[str, Any]  # {"function": qualified name, "args": {...}}
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "dataset": self.dataset,
            "splits": list(self.splits),
            "converter": dict(self.converter),
        }

    @classmethod
    def from_dict(cls, data: object, where: str = "dataset info") -> DatasetInfo:
        top = _Fields(data, where)
        top.check_keys(("format_version", "dataset", "splits", "converter"))
        version = top.int_("format_version")
        if version != FORMAT_VERSION:
            raise top.error("format_version", f"unsupported version {version}")
        splits = top.list_("splits")
        if not splits or any(s not in SPLITS for s in splits) or len(set(splits)) != len(splits):
            raise top.error(
                "splits", f"expected distinct names from {list(SPLITS)}, got {splits!r}"
            )
        converter = top.sub("converter")
        converter.check_keys(("function", "args"))
        converter.str_("function")
        converter.sub("args")
        return cls(top.str_("dataset"), tuple(splits), converter.data, version)

    def save(self, path: str | Path) -> None:
        DatasetInfo.from_dict(self.to_dict(), str(path))
        Path(path).write_text(dumps_json(self.to_dict()), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path | Location) -> DatasetInfo:
        location = Location.of(path)
        return cls.from_dict(_read_json(location), str(location))


def dumps_json(value: object, indent: str = "") -> str:
    """JSON with flat records, and values that fit in 100 characters, kept on one line, so
    a manifest reads as one line per class instead of one line per field."""
    flat = json.dumps(value, ensure_ascii=False)
    record = isinstance(value, dict) and not any(isinstance(v, dict | list) for v in value.values())
    if len(indent) + len(flat) <= 100 or record or not isinstance(value, dict | list) or not value:
        return flat + ("\n" if not indent else "")
    inner = indent + " "
    if isinstance(value, dict):
        items = [
            f"{inner}{json.dumps(k, ensure_ascii=False)}: {dumps_json(v, inner)}"
            for k, v in value.items()
        ]
        text = "{\n" + ",\n".join(items) + f"\n{indent}}}"
    else:
        items = [inner + dumps_json(v, inner) for v in value]
        text = "[\n" + ",\n".join(items) + f"\n{indent}]"
    return text + ("\n" if not indent else "")


def _read_json(path: Location) -> object:
    if path.is_dir():
        raise ValueError(f"{path}: a directory, not a JSON file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise  # the callers name what is missing
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc})") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from None
