"""Atomic writing of a dataset directory (shards, manifests, dataset.json).

Everything is built in ``<out>.tmp-<random>`` beside the output and renamed into place
only once complete, so a failed or interrupted conversion never leaves a half-written
dataset, and an overwrite never loses the previous dataset before the new one exists.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from metadist.data.schema import (
    DATASET_INFO_NAME,
    MANIFEST_NAME,
    SHARD_SCHEMA,
    SPLITS,
    ClassEntry,
    DatasetInfo,
    ImageInfo,
    Manifest,
    PreprocessingInfo,
    ShardEntry,
    SourceInfo,
    SplitInfo,
    shard_file_name,
)

DEFAULT_SHARD_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class ClassData:
    """One class to write: its images are fetched with ``read(path)`` at write time."""

    label: str
    group: str | None
    paths: Sequence[str]  # stored in image.path; the key passed to ``read``
    read: Callable[[str], bytes]


@dataclass(frozen=True)
class SplitData:
    """One split to write; the writer fills in classes, shards and split_info.classes."""

    classes: Sequence[ClassData]
    source: SourceInfo
    image: ImageInfo
    preprocessing: PreprocessingInfo
    rotations: Sequence[int]
    method: str
    seed: int | None
    synthetic: bool = False


def is_dataset_dir(path: Path) -> bool:
    return (path / DATASET_INFO_NAME).exists() or any(
        (path / s / MANIFEST_NAME).exists() for s in SPLITS
    )


def _foreign_entries(out: Path) -> list[str]:
    """Entries of a dataset directory that this package would not have written."""
    foreign = []
    for entry in sorted(out.iterdir()):
        if entry.name == DATASET_INFO_NAME and entry.is_file():
            continue
        if entry.name in SPLITS and entry.is_dir() and not entry.is_symlink():
            for f in sorted(entry.iterdir()):
                ours = f.is_file() and (
                    f.name == MANIFEST_NAME
                    or (f.name.startswith("shard-") and f.name.endswith(".parquet"))
                )
                if not ours:
                    foreign.append(f"{entry.name}/{f.name}")
            continue
        foreign.append(entry.name)
    return foreign


def _check_writable(parent: Path, out: Path) -> None:
    """The dataset is built beside ``out`` and renamed into place: the folder that will hold
    it must exist (or be creatable) and take a file, checked before the decode pass."""
    existing = next((p for p in [parent, *parent.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        raise FileExistsError(f"output {out}: {existing} is a file, not a folder")
    try:  # in the nearest folder that exists: nothing is created for a conversion that fails
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".metadist-probe-"):
            pass
    except OSError as err:
        raise FileExistsError(f"output {out}: cannot write in {existing} ({err.strerror})"
                              ) from None


def check_output(out: str | Path, overwrite: bool) -> None:
    """Raise ``FileExistsError`` unless a dataset may be written at ``out``.

    Allowed: ``out`` absent, an empty directory, or (with ``overwrite``) a directory that
    holds only a metadist dataset. Anything else might be user files and is never touched.
    Converters call this before their (slow) validation pass, and the writer again before
    it commits.
    """
    out = Path(out)
    if out.is_symlink():
        raise FileExistsError(f"{out} is a symlink; pass the real directory")
    if not out.exists():
        _check_writable(out.parent, out)
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if not any(out.iterdir()):
        return
    if not is_dataset_dir(out):
        raise FileExistsError(
            f"{out} is not empty and does not hold a metadist dataset; refusing to write there"
        )
    if not overwrite:
        raise FileExistsError(f"{out} already holds a dataset; pass overwrite=True to replace it")
    foreign = _foreign_entries(out)
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise FileExistsError(
            f"{out} holds a dataset but also files metadist did not write ({shown}); "
            "refusing to replace it"
        )


def write_dataset(
    out: str | Path,
    splits: Mapping[str, SplitData],
    *,
    dataset: str,
    converter: Mapping[str, Any],
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write ``splits`` as a dataset at ``out``, atomically. Returns ``out``.

    ``converter`` is recorded in dataset.json ({"function": ..., "args": {...}}).
    """
    out = Path(out)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise ValueError(f"splits must be a non-empty subset of {list(SPLITS)}, got {list(splits)}")
    seen: dict[str, str] = {}
    for name, split in splits.items():
        for c in split.classes:
            if c.label in seen:
                raise ValueError(
                    f"class {c.label!r} is in both the {seen[c.label]} and the "
                    f"{name} split; splits must be disjoint"
                )
            seen[c.label] = name
    present = [s for s in SPLITS if s in splits]
    info = DatasetInfo(dataset, tuple(present), dict(converter))
    DatasetInfo.from_dict(info.to_dict(), "dataset info")  # fail before the slow part
    check_output(out, overwrite)

    out.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would end up on the published dataset.
    tmp = out.with_name(f"{out.name}.tmp-{secrets.token_hex(6)}")
    tmp.mkdir()
    try:
        for name in present:
            split_dir = tmp / name
            split_dir.mkdir()
            manifest = _write_split(split_dir, name, splits[name], dataset, shard_bytes)
            manifest.save(split_dir / MANIFEST_NAME)
        info.save(tmp / DATASET_INFO_NAME)
        _commit(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    # Re-check: the output may have changed during a long conversion.
    check_output(out, overwrite)
    if not out.exists():
        os.rename(tmp, out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        os.rename(tmp, out)
        return
    # Move the old dataset aside first so that at every instant one complete dataset
    # exists on disk; delete it only after the new one is in place.
    old = out.with_name(f"{out.name}.old-{secrets.token_hex(4)}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_split(
    split_dir: Path, split: str, data: SplitData, dataset: str, shard_bytes: int
) -> Manifest:
    if not data.classes:
        raise ValueError(f"split {split!r} has no classes")
    classes: list[ClassEntry] = []
    shards: list[ShardEntry] = []
    writer: pq.ParquetWriter | None = None
    file = ""
    size = rows = groups = 0

    def close() -> None:
        assert writer is not None
        writer.close()
        shards.append(_shard_entry(split_dir / file, rows, groups))

    try:
        for cls in data.classes:
            if not cls.paths:
                raise ValueError(f"class {cls.label!r} of split {split!r} has no images")
            blobs = [cls.read(p) for p in cls.paths]
            nbytes = sum(map(len, blobs))
            # A class is never split across shards (one class = one row group), so a new
            # shard starts before the current one would grow past shard_bytes.
            if writer is None or (groups and size + nbytes > shard_bytes):
                if writer is not None:
                    close()
                file = shard_file_name(len(shards))
                writer = _open_shard(split_dir / file)
                size = rows = groups = 0
            writer.write_table(_class_table(cls, blobs), row_group_size=len(blobs))
            classes.append(ClassEntry(cls.label, cls.group, len(blobs), file, groups))
            size += nbytes
            rows += len(blobs)
            groups += 1
        close()
        writer = None
    finally:
        if writer is not None:
            writer.close()

    return Manifest(
        dataset=dataset,
        split=split,
        source=data.source,
        synthetic=data.synthetic,
        image=data.image,
        preprocessing=data.preprocessing,
        rotations=tuple(data.rotations),
        split_info=SplitInfo(data.method, data.seed, tuple(c.label for c in classes)),
        classes=tuple(classes),
        shards=tuple(shards),
    )


def _open_shard(path: Path) -> pq.ParquetWriter:
    return pq.ParquetWriter(
        path,
        SHARD_SCHEMA,
        # Image bytes are PNG/JPEG and do not compress further; only labels benefit.
        compression={"image.bytes": "none", "image.path": "zstd", "label": "zstd", "group": "zstd"},
        use_dictionary=["label", "group"],
        write_statistics=["label", "group"],
    )


def _class_table(cls: ClassData, blobs: list[bytes]) -> pa.Table:
    n = len(blobs)
    image = pa.StructArray.from_arrays(
        [pa.array(blobs, pa.binary()), pa.array(list(cls.paths), pa.string())],
        fields=list(SHARD_SCHEMA.field("image").type),
    )
    return pa.Table.from_arrays(
        [image, pa.array([cls.label] * n, pa.string()), pa.array([cls.group] * n, pa.string())],
        schema=SHARD_SCHEMA,
    )


def _shard_entry(path: Path, rows: int, groups: int) -> ShardEntry:
    # Guard the one-class-one-row-group invariant the readers rely on.
    found = pq.read_metadata(path).num_row_groups
    if found != groups:
        raise RuntimeError(f"{path}: wrote {groups} classes but found {found} row groups")
    return ShardEntry(path.name, rows, sha256_file(path))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
