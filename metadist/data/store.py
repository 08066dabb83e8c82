"""Read access to one split: per-class decoded, resized, rotated uint8 image tensors.

The store checks the manifest against the shards when opened, reads only the row group
of a requested class, and caches decoded classes (before rotation, so the four rotated
copies of an Omniglot character share one cache entry). It pickles without its open
files and cache, so it can be shipped to worker processes or Ray actors cheaply.

The split may be a local directory or an object-store URI (``s3://bucket/omniglot/train``):
every read goes through the split's ``pyarrow.fs`` filesystem (see ``location``), the same
code path for both.

With a ``decode_cache`` directory, each decoded class is also written there once as a
``.npy`` file and read back memory-mapped, so every process on the node (episode actors,
torchrun ranks, the trials of a sweep, the next run) shares one copy through the page
cache instead of decoding and holding its own. Its subdirectory is keyed by the shards'
sha256 and the preprocessing, so a changed dataset or image size never reads stale pixels.
``decode_cache_max_gb`` caps the directory, least recently used entries first
(``metadist.data.decode_cache``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from metadist.data.decode_cache import SizeCap, key_name, touch
from metadist.data.images import decode_image, resize
from metadist.data.location import Location
from metadist.data.schema import MANIFEST_NAME, SHARD_SCHEMA, ClassEntry, Manifest

log = logging.getLogger(__name__)


class ClassStore:
    """Classes of one split (``<dataset>/<split>``, a local path, a URI such as
    ``s3://bucket/omniglot/train``, or a ``Location``), rotations expanded into classes.

    Virtual class ``i`` is base class ``i % num_base_classes`` rotated by
    ``rotations[i // num_base_classes]`` degrees counter-clockwise, so the first
    ``num_base_classes`` classes are the unrotated ones.

    ``image_size``/``channels`` default to the manifest's recommended preprocessing.
    ``verify`` also checks every shard's sha256 (reads every byte once).
    ``max_cached_classes`` bounds the decoded-class cache (None: unbounded, 0: no cache).
    ``decode_cache``: a node-local directory shared by processes (see the module doc);
    ``decode_cache_max_gb``: its size cap in GB (10^9 bytes; None: no cap).
    """

    def __init__(
        self,
        split_dir: str | Path | Location,
        *,
        image_size: int | None = None,
        channels: int | None = None,
        verify: bool = True,
        max_cached_classes: int | None = None,
        decode_cache: str | Path | None = None,
        decode_cache_max_gb: float | None = None,
    ) -> None:
        self.split_dir = Location.of(split_dir)
        self.manifest = Manifest.load(self.split_dir / MANIFEST_NAME)
        pre = self.manifest.preprocessing
        self.image_size = pre.image_size if image_size is None else image_size
        self.channels = pre.channels if channels is None else channels
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if (
            isinstance(self.image_size, bool)
            or not isinstance(self.image_size, int)
            or self.image_size < 1
        ):
            raise ValueError(f"image_size must be a positive integer, got {self.image_size!r}")
        self.max_cached_classes = max_cached_classes
        self.decode_cache = None if decode_cache is None else (
            Path(decode_cache) / self._decode_cache_key())
        if decode_cache_max_gb is not None:
            if decode_cache is None:
                raise ValueError(f"decode_cache_max_gb={decode_cache_max_gb} caps a decode "
                                 "cache, and decode_cache is not set")
            if isinstance(decode_cache_max_gb, bool) or not decode_cache_max_gb > 0:
                raise ValueError(
                    f"decode_cache_max_gb must be > 0 (GB), got {decode_cache_max_gb!r}")
        self.decode_cache_max_bytes = (
            None if decode_cache_max_gb is None else int(decode_cache_max_gb * 1e9))
        self._entries: tuple[ClassEntry, ...] = self.manifest.classes
        self._check_shards(verify)
        self._reset_runtime_state()

    # --- structure ----------------------------------------------------------------------

    @property
    def split(self) -> str:
        return self.manifest.split

    @property
    def rotations(self) -> tuple[int, ...]:
        return self.manifest.rotations

    @property
    def num_base_classes(self) -> int:
        return len(self._entries)

    @property
    def num_classes(self) -> int:
        return len(self._entries) * len(self.rotations)

    @property
    def class_names(self) -> list[str]:
        names = []
        for degrees in self.rotations:
            suffix = "" if degrees == 0 else f"@rot{degrees}"
            names.extend(e.label + suffix for e in self._entries)
        return names

    def base_class(self, i: int) -> tuple[int, int]:
        """(base class index, rotation in degrees) of virtual class ``i``."""
        if not 0 <= i < self.num_classes:
            raise IndexError(
                f"class {i} out of range: split {self.split!r} has {self.num_classes} classes"
            )
        r, base = divmod(int(i), len(self._entries))
        return base, self.rotations[r]

    def class_size(self, i: int) -> int:
        return self._entries[self.base_class(i)[0]].count

    # --- loading ------------------------------------------------------------------------

    def load_class(self, i: int) -> torch.Tensor:
        """All images of virtual class ``i``: uint8 [n, C, image_size, image_size]."""
        return self.load_examples(i, range(self.class_size(i)))

    def load_examples(self, i: int, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Images ``indices`` (positions within the class) of virtual class ``i``, as a new
        uint8 tensor [len(indices), C, image_size, image_size]."""
        base, degrees = self.base_class(i)
        images = self._decoded(base)[torch.as_tensor(np.asarray(indices, dtype=np.int64))]
        if degrees:
            images = torch.rot90(images, degrees // 90, dims=(-2, -1)).contiguous()
        return images

    def _decoded(self, base: int) -> torch.Tensor:
        with self._lock:
            cached = self._cache.get(base)
            if cached is not None:
                self._cache.move_to_end(base)
                return cached
        images = self._decode_class(base) if self.decode_cache is None else self._shared(base)
        limit = self.max_cached_classes
        if limit is None or limit > 0:
            with self._lock:
                self._cache[base] = images
                while limit is not None and len(self._cache) > limit:
                    self._cache.popitem(last=False)
        return images

    def _shared(self, base: int) -> torch.Tensor:
        """Class ``base`` from the decode cache, decoding and adding it if missing."""
        path = self.decode_cache / f"{base}.npy"
        images = self._read_shared(path, base)
        if images is not None:
            return images
        images = self._decode_class(base)
        if not self._write_shared(path, images):
            return images
        # Hand out the mapped file, not the private copy: then this process shares it too.
        shared = self._read_shared(path, base)
        return images if shared is None else shared

    def _read_shared(self, path: Path, base: int) -> torch.Tensor | None:
        expected = (self._entries[base].count, self.channels, self.image_size, self.image_size)
        try:
            # Copy-on-write: pages stay shared with every reader; nothing here writes them.
            array = np.load(path, mmap_mode="c")
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable decode-cache entry (%s); decoding the class again",
                        path, exc)
            return None
        if array.shape != expected or array.dtype != np.uint8:
            log.warning("%s: decode-cache entry holds %s %s, class %r needs uint8 %s; "
                        "decoding it again", path, array.dtype, array.shape,
                        self._entries[base].label, expected)
            return None
        if not _checksum_matches(path, array):
            log.warning("%s: decode-cache entry does not match its checksum (changed or "
                        "written by another version); decoding class %r again", path,
                        self._entries[base].label)
            return None
        if self.decode_cache_max_bytes is not None:
            touch(path)  # the cap evicts the entries used longest ago
        return torch.from_numpy(array)

    def _write_shared(self, path: Path, images: torch.Tensor) -> bool:
        if not self._cache_writable:
            return False
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                array = np.ascontiguousarray(images.numpy())
                np.save(f, array)
                f.write(CHECKSUM_MAGIC + hashlib.sha256(memoryview(array).cast("B")).digest())
                size = f.tell()
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the entry from other users
            # Readers see the whole file or none: two processes decoding the same class at
            # once both write, and the last rename wins with identical bytes.
            os.replace(tmp, path)
        except OSError as exc:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            self._cache_writable = False
            log.warning("decode cache %s: cannot write (%s); this process keeps the classes "
                        "it decodes to itself", self.decode_cache, exc)
            return False
        if self._size_cap is not None:
            self._evict(keep=path, size=size)
        return True

    def _evict(self, keep: Path, size: int) -> None:
        root = self.decode_cache.parent
        try:
            recent = self._size_cap.wrote(keep, size)
        except OSError as exc:  # a cache that cannot be listed is still a cache
            log.warning("decode cache %s: cannot enforce its size cap (%s)", root, exc)
            return
        if recent and not self._thrash_warned:
            self._thrash_warned = True
            log.warning(
                "decode cache %s: over its cap of %.3g GB, evicted %d entries used within "
                "the last minute; classes in use are decoded again and again: raise "
                "data.decode_cache_max_gb above what the running jobs read", root,
                self.decode_cache_max_bytes / 1e9, recent)

    def _decode_cache_key(self) -> str:
        # The shards' sha256 (checked against the manifest) are in the key, so entries of a
        # changed dataset are never read; each entry's own checksum covers its pixels.
        content = json.dumps({
            "format": 1, "split": self.manifest.split,
            "shards": [s.sha256 for s in self.manifest.shards],
            "image_size": self.image_size, "channels": self.channels,
        }, sort_keys=True)
        digest = hashlib.sha256(content.encode()).hexdigest()[:16]
        return key_name(self.manifest.split, self.image_size, self.channels, digest)

    def _decode_class(self, base: int) -> torch.Tensor:
        entry = self._entries[base]
        path = self.split_dir / entry.shard
        column = self._file(entry.shard).read_row_group(entry.row_group, columns=["image"])
        rows = column.column("image").to_pylist()
        if len(rows) != entry.count:
            raise ValueError(
                f"{path}: row group {entry.row_group} (class {entry.label!r}) has "
                f"{len(rows)} rows, the manifest says {entry.count}"
            )
        arrays = []
        for j, row in enumerate(rows):
            try:
                arrays.append(decode_image(row["bytes"], self.channels))
            except Exception as exc:
                raise ValueError(
                    f"{path}: class {entry.label!r}, row {j} of row group {entry.row_group} "
                    f"(source {row['path']}): cannot decode image ({type(exc).__name__}: {exc})"
                ) from exc
        if len({a.shape for a in arrays}) == 1:
            batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
            return resize(batch, self.image_size)
        return torch.stack(
            [resize(torch.from_numpy(a).permute(2, 0, 1), self.image_size) for a in arrays]
        )

    def _file(self, shard: str) -> pq.ParquetFile:
        # A forked worker must not share the parent's file handles; reopen per process.
        if self._pid != os.getpid():
            self._files = {}
            self._pid = os.getpid()
        handle = self._files.get(shard)
        if handle is None:
            handle = self._files[shard] = _open_parquet(self.split_dir / shard)
        return handle

    # --- checks -------------------------------------------------------------------------

    def _check_shards(self, verify: bool) -> None:
        manifest_path = self.split_dir / MANIFEST_NAME
        for k, shard in enumerate(self.manifest.shards):
            path = self.split_dir / shard.file
            if not path.is_file():
                raise ValueError(f"{path}: shard listed in {manifest_path} is missing")
            if verify:
                digest = path.sha256()
                if digest != shard.sha256:
                    raise ValueError(
                        f"{path}: sha256 {digest} does not match field 'shards[{k}].sha256' "
                        f"({shard.sha256}) of {manifest_path}; the shard changed after "
                        "conversion"
                    )
            try:
                pf = _open_parquet(path)
            except Exception as exc:
                raise ValueError(f"{path}: not a readable parquet file ({exc})") from exc
            try:
                self._check_shard(pf, path, k)
            finally:
                pf.close(force=True)

    def _check_shard(self, pf: pq.ParquetFile, path: Location, k: int) -> None:
        shard = self.manifest.shards[k]
        if not pf.schema_arrow.equals(SHARD_SCHEMA, check_metadata=False):
            raise ValueError(f"{path}: schema does not match SHARD_SCHEMA:\n{pf.schema_arrow}")
        meta = pf.metadata
        if meta.num_rows != shard.rows:
            raise ValueError(
                f"{path}: has {meta.num_rows} rows, field 'shards[{k}].rows' of "
                f"the manifest says {shard.rows}"
            )
        members = sorted(
            (e for e in self._entries if e.shard == shard.file), key=lambda e: e.row_group
        )
        if meta.num_row_groups != len(members):
            raise ValueError(
                f"{path}: has {meta.num_row_groups} row groups, the manifest "
                f"places {len(members)} classes in it"
            )
        # The label/group columns are tiny next to the images; reading them whole is cheap.
        columns = pf.read(columns=["label", "group"])
        offset = 0
        for e in members:
            n = meta.row_group(e.row_group).num_rows
            if n != e.count:
                raise ValueError(
                    f"{path}: row group {e.row_group} (class {e.label!r}) has "
                    f"{n} rows, the manifest says count {e.count}"
                )
            for field, expected in (("label", e.label), ("group", e.group)):
                found = pc.unique(columns.column(field).slice(offset, n)).to_pylist()
                if found != [expected]:
                    raise ValueError(
                        f"{path}: row group {e.row_group} holds {field} {found}, "
                        f"the manifest says {expected!r}"
                    )
            offset += n

    # --- pickling -----------------------------------------------------------------------

    def _reset_runtime_state(self) -> None:
        self._files: dict[str, pq.ParquetFile] = {}
        self._pid = os.getpid()
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self._cache_writable = True
        self._thrash_warned = False
        self._size_cap = None if self.decode_cache_max_bytes is None else SizeCap(
            self.decode_cache.parent, self.decode_cache_max_bytes)

    def __getstate__(self) -> dict[str, Any]:
        # Open files and the lock cannot travel; the cache could but would bloat every
        # copy sent to a worker. The receiver does not re-verify the shards.
        state = self.__dict__.copy()
        for key in ("_files", "_pid", "_cache", "_lock", "_cache_writable",
                    "_thrash_warned", "_size_cap"):
            del state[key]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_runtime_state()

    def __repr__(self) -> str:
        return (
            f"ClassStore({str(self.split_dir)!r}, split={self.split!r}, "
            f"classes={self.num_classes}, image_size={self.image_size}, "
            f"channels={self.channels})"
        )


def _open_parquet(path: Location) -> pq.ParquetFile:
    # pre_buffer fetches the column chunks a read needs concurrently: on an object store
    # that turns one request per chunk into parallel ranged reads.
    return pq.ParquetFile(path.open_input_file(), pre_buffer=True)


# Each entry ends with this and the sha256 of its pixels (np.load ignores trailing bytes):
# a changed or truncated entry is decoded again rather than fed to training (12 ms for a
# miniImageNet class, once per class and process).
CHECKSUM_MAGIC = b"MDSHA256"


def _checksum_matches(path: Path, array: np.ndarray) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(-(len(CHECKSUM_MAGIC) + 32), os.SEEK_END)
            trailer = f.read()
    except OSError:
        return False
    digest = hashlib.sha256(memoryview(np.ascontiguousarray(array)).cast("B")).digest()
    return trailer == CHECKSUM_MAGIC + digest
