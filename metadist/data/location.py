"""Where a converted dataset lives: a local directory or an object-store URI.

Every read of a dataset (``dataset.json``, manifests, shard checks, row groups) goes
through one ``pyarrow.fs.FileSystem`` resolved from the dataset's location with
``FileSystem.from_uri``, so local disks, mounted volumes and object stores share one code
path::

    data/omniglot                          local path (relative to the working directory)
    /mnt/shared/omniglot                   local path, e.g. a mounted volume
    file:///mnt/shared/omniglot            the same, as a URI
    s3://bucket/omniglot                   Amazon S3 or any S3 API (credentials: AWS_* env)
    s3://bucket/omniglot?endpoint_override=127.0.0.1:9000&scheme=http
    gs://bucket/omniglot                   Google Cloud Storage

On S3 without ``?region=...`` pyarrow asks the bucket for its region (one request).
Writing stays local: converters build a dataset on disk, which is then uploaded as is.

A ``Location`` pickles (its filesystem carries the URI's options, never an open handle),
so it can be sent to worker processes and Ray actors, which resolve their own credentials.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_CHUNK = 1 << 20


def is_uri(where: str | os.PathLike) -> bool:
    """True for ``scheme://...`` (``s3://``, ``gs://``, ``file://``); false for local paths,
    Windows drive paths included."""
    return isinstance(where, str) and _SCHEME.match(where) is not None


@dataclass(frozen=True)
class Location:
    """A file or directory: ``path`` inside ``fs``; ``name`` is what messages show.

    ``name`` is the local path as given, or the URI without credentials or query options
    (``s3://bucket/omniglot/train/shard-00000.parquet``), so errors never print secrets.
    """

    fs: pafs.FileSystem
    path: str
    name: str

    @classmethod
    def of(cls, where: str | os.PathLike | Location) -> Location:
        """Resolve a local path or a URI. A relative local path is made absolute now, so a
        copy sent to another process still finds it whatever that process's directory."""
        if isinstance(where, Location):
            return where
        if is_uri(where):
            parts = urlsplit(where)
            host = parts.netloc.rpartition("@")[2]  # drop user:secret@
            shown = f"{parts.scheme}://{host}{parts.path.rstrip('/') or parts.path}"
            try:
                fs, path = pafs.FileSystem.from_uri(where)
            except Exception as exc:
                detail = str(exc).replace(where, shown)
                raise ValueError(f"dataset location {shown}: {detail}") from None
            return cls(fs, path.rstrip("/") or path, shown)
        local = Path(where)
        return cls(pafs.LocalFileSystem(), Path(os.path.abspath(local)).as_posix(), str(local))

    def __truediv__(self, name: str) -> Location:
        """The entry ``name`` of this directory; ``name`` is one plain path component."""
        if (
            not isinstance(name, str)
            or not name
            or name in (".", "..")
            or any(c in name for c in "/\\\0:")
        ):
            raise ValueError(f"{self}: {name!r} is not a plain file name inside it")
        if isinstance(self.fs, pafs.LocalFileSystem) and not is_uri(self.name):
            shown = str(Path(self.name) / name)
        else:
            shown = f"{self.name.rstrip('/')}/{name}"
        return Location(self.fs, f"{self.path.rstrip('/')}/{name}", shown)

    def __str__(self) -> str:
        return self.name

    # --- reading: every OSError names this location --------------------------------------

    @contextmanager
    def _io(self) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{self}: no such file ({exc})") from exc
        except OSError as exc:
            raise OSError(f"{self}: {exc}") from exc

    def info(self) -> pafs.FileInfo:
        with self._io():
            return self.fs.get_file_info(self.path)

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def read_bytes(self) -> bytes:
        with self._io(), self.fs.open_input_stream(self.path) as f:
            return f.read()

    def open_input_file(self) -> pa.NativeFile:
        """A random-access handle (object stores: ranged reads), e.g. for ParquetFile."""
        with self._io():
            return self.fs.open_input_file(self.path)

    def sha256(self) -> str:
        """Hex sha256 of the file's bytes, streamed (never the whole file in memory)."""
        digest = hashlib.sha256()
        with self._io(), self.fs.open_input_stream(self.path) as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()
