"""A size cap for the shared decode cache: least recently used entries go first.

The cache (``ClassStore``'s ``decode_cache``) is one directory of keyed subdirectories,
one per dataset split and preprocessing, each holding a ``.npy`` file per decoded class.
Every process on the node writes to it, so there is no owner to keep an index: the file
system is the index. A process that writes entries sums the directory now and then
(``SizeCap``) and, when it is over the cap, deletes the entries used longest ago; readers
mark use by bumping an entry's mtime. Entries of a dataset that is no longer read are the
oldest, so they go first.

Deleting an entry another process is about to open only makes that process decode the
class again. Deleting one it has already mapped takes nothing from it: the mapping keeps
the file's pages alive until the process drops it (so in ``/dev/shm`` the memory comes
back only then: the cap bounds what the directory holds, not what live processes map).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import time
from collections.abc import Iterator
from pathlib import Path

# A writer killed between mkstemp and the rename leaves its temporary file behind; one
# this old is no write in flight (a class is written in well under a second).
STALE_TMP_SECONDS = 3600.0
# An evicted entry touched this recently was still in use: the cap is too small.
RECENT_SECONDS = 60.0
# Between scans a writer counts only its own writes (the others' reach it at its next
# scan). Scanning after each 1% of the cap it writes keeps what one writer cannot see
# to 1% of the cap per other writer; evicting down to 99% of the cap gives the next 1%
# of writes room without a scan, so a full cache is not scanned on every write.
SLACK_FRACTION = 0.01


def key_name(split: str, image_size: int, channels: int, digest: str) -> str:
    """The subdirectory of one split and preprocessing; ``KEY_GLOB`` matches it."""
    return f"{split}-{image_size}px-{channels}ch-{digest}"


# Eviction looks only here: a cache put straight in a shared directory such as /dev/shm
# must never touch others' files.
KEY_GLOB = "*-*px-*ch-*"


def touch(entry: Path) -> None:
    """Mark ``entry`` as used now (a read-only or vanished entry is left as it is)."""
    with contextlib.suppress(OSError):
        os.utime(entry)


class SizeCap:
    """One writing process's hold on a capped cache directory ``root``.

    A single writer keeps the directory within ``max_bytes`` after every write; with
    several, each may be unaware of up to 1% of the cap that the others wrote since its
    last scan. A process holds one per store and never shares it (it is not picklable
    state: a copy sent elsewhere starts with a scan)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.slack = max(1, int(max_bytes * SLACK_FRACTION))
        self.scans = 0
        self._known: int | None = None  # bytes the last scan left, None: no scan yet
        self._unseen = 0  # bytes this process wrote since that scan

    def wrote(self, entry: Path, size: int) -> int:
        """Count ``entry`` (``size`` bytes) just written, then scan and evict if that
        may have taken the directory over the cap, or if the last scan is 1% of the cap
        of this process's writes ago. Returns ``evict_least_recent``'s count of
        recently used entries evicted."""
        self._unseen += size
        if (self._known is not None and self._unseen <= self.slack
                and self._known + self._unseen <= self.max_bytes):
            return 0
        recent, self._known = evict_least_recent(
            self.root, self.max_bytes, keep=entry, target_bytes=self.max_bytes - self.slack)
        self._unseen = 0
        self.scans += 1
        return recent


def evict_least_recent(root: Path, max_bytes: int, keep: Path,
                       target_bytes: int | None = None) -> tuple[int, int]:
    """If ``.npy`` entries under ``root``'s subdirectories and the temporary files of
    writes in flight hold more than ``max_bytes``, delete entries, least recently used
    first, until they hold at most ``target_bytes`` (default ``max_bytes``); never
    ``keep`` (the entry just written). Stale temporary files are deleted as well.
    Returns how many of the entries deleted were used within the last minute (more than
    none: the cap is smaller than what is being read) and the bytes left."""
    target = max_bytes if target_bytes is None else target_bytes
    now = time.time()
    keep_path = str(keep)
    entries: list[tuple[int, str, int]] = []
    total = 0
    for path, name, stat in _listing(root):
        if name.startswith(".") and name.endswith(".tmp"):
            if now - stat.st_mtime > STALE_TMP_SECONDS:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            else:
                total += stat.st_size
        elif name.endswith(".npy"):
            total += stat.st_size
            if path != keep_path:
                entries.append((stat.st_mtime_ns, path, stat.st_size))
    recent = 0
    if total <= max_bytes:
        return recent, total
    for mtime_ns, path, size in sorted(entries):
        if total <= target:
            break
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass  # another writer evicted it first; its bytes are gone all the same
        else:
            recent += now - mtime_ns / 1e9 < RECENT_SECONDS
        total -= size
    return recent, total


def _listing(root: Path) -> Iterator[tuple[str, str, os.stat_result]]:
    """(path, name, stat) of every file in ``root``'s key subdirectories. Writes to a
    capped cache run this often, so it stays with scandir and strings: ``Path.glob`` and a
    ``Path`` per entry took over twice as long (benchmarks/decode_cache_eviction.py)."""
    with os.scandir(root) as keys:
        for key in keys:
            if not fnmatch.fnmatchcase(key.name, KEY_GLOB) or not key.is_dir(
                    follow_symlinks=False):
                continue
            try:
                files = os.scandir(key.path)
            except FileNotFoundError:
                continue
            with files:
                for entry in files:
                    try:
                        stat = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:  # evicted or renamed by another process
                        continue
                    yield entry.path, entry.name, stat
