"""Uniform read access to raw image files in a zip archive or a directory tree.

Both kinds name files by a relative POSIX path (for a zip: the member name), so converters
handle released zips and extracted folders alike without extracting anything to disk.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Protocol, Self


class ImageSource(Protocol):
    name: str

    def files(self) -> list[str]: ...

    def read(self, path: str) -> bytes: ...

    def describe(self, path: str) -> str: ...

    def close(self) -> None: ...


def _hidden(path: str) -> bool:
    # macOS archive debris and dot files are never data.
    return any(part.startswith(".") or part == "__MACOSX" for part in path.split("/"))


# No image of a few-shot data set comes near these; an archive whose members declare more
# is refused before anything is decompressed (a zip bomb would otherwise be read whole).
MAX_MEMBER_BYTES = 64 * 2**20
MAX_ARCHIVE_BYTES = 64 * 2**30


class ZipSource:
    """Members of one zip file (read from one thread at a time). Their declared sizes are
    bounded (``MAX_MEMBER_BYTES`` each, ``MAX_ARCHIVE_BYTES`` in all) before any is read;
    zipfile never inflates a member past its declared size."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.name = str(self.path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise ValueError(f"{self.path}: not a readable zip file ({exc})") from None
        self._members = {info.filename: info for info in self._zip.infolist() if not info.is_dir()}
        total = 0
        for info in self._members.values():
            if info.file_size > MAX_MEMBER_BYTES:
                self._zip.close()
                raise ValueError(f"{self.describe(info.filename)}: declares {info.file_size:,} "
                                 f"bytes uncompressed, more than an image may be "
                                 f"({MAX_MEMBER_BYTES:,})")
            total += info.file_size
        if total > MAX_ARCHIVE_BYTES:
            self._zip.close()
            raise ValueError(f"{self.path}: declares {total:,} bytes uncompressed in all, more "
                             f"than {MAX_ARCHIVE_BYTES:,}")

    def files(self) -> list[str]:
        return sorted(p for p in self._members if not _hidden(p))

    def read(self, path: str) -> bytes:
        if path not in self._members:
            raise ValueError(f"{self.describe(path)}: missing from the archive")
        try:
            return self._zip.read(self._members[path])
        except (zipfile.BadZipFile, OSError, EOFError) as exc:  # CRC errors are BadZipFile
            raise ValueError(f"{self.describe(path)}: cannot read ({exc})") from exc

    def describe(self, path: str) -> str:
        return f"{self.path}:{path}"

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DirSource:
    """Files under ``root/subdir``, named by their path relative to ``root``."""

    def __init__(self, root: str | Path, subdir: str = "") -> None:
        self.root = Path(root)
        self.subdir = subdir
        self.name = str(self.root / subdir)

    def files(self) -> list[str]:
        """Every file under ``root/subdir``. A symbolic link is refused, naming it: one that
        leaves the tree would read files from elsewhere, and one into the tree would give
        another class's (or split's) images to this one."""
        top = self.root / self.subdir
        if self.subdir and top.is_symlink():
            raise ValueError(f"{top}: a symbolic link (to {os.path.realpath(top)}); copy the "
                             "files in, or convert the folder it points to")
        found = []
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if not _hidden(d)]
            for name in [*dirnames, *filenames]:
                path = Path(dirpath) / name
                if path.is_symlink():
                    raise ValueError(f"{path}: a symbolic link (to {os.path.realpath(path)}); "
                                     "copy the files in, or convert the folder it points to")
            rel = Path(dirpath).relative_to(self.root).as_posix()
            found.extend(f"{rel}/{f}" if rel != "." else f for f in filenames if not _hidden(f))
        return sorted(found)

    def read(self, path: str) -> bytes:
        try:
            return (self.root / path).read_bytes()
        except FileNotFoundError:
            raise ValueError(f"{self.describe(path)}: file not found") from None
        except OSError as exc:
            raise ValueError(f"{self.describe(path)}: cannot read ({exc})") from exc

    def describe(self, path: str) -> str:
        return str(self.root / path)

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
