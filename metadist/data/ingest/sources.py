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


class ZipSource:
    """Members of one zip file (read from one thread at a time)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.name = str(self.path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile as exc:
            raise ValueError(f"{self.path}: not a readable zip file ({exc})") from exc
        self._members = {info.filename: info for info in self._zip.infolist() if not info.is_dir()}

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
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root / self.subdir):
            dirnames[:] = [d for d in dirnames if not _hidden(d)]
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
