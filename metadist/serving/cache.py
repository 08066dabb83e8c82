"""Adapted models kept by the hash of their support set, so a repeated task skips the
inner loop (and the decoding of its support images)."""

from __future__ import annotations

import threading
from collections import OrderedDict

from metadist.learner import AdaptedLearner


class AdaptedCache:
    """Least-recently-used adapted parameters, bounded by their bytes.

    Only the tensors adaptation changed are counted: ProtoNet and ANIL share the body
    with the meta-learned initialisation, so an entry costs its head alone."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, tuple[AdaptedLearner, int]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0
        self.lock = threading.Lock()

    def get(self, key: str) -> AdaptedLearner | None:
        with self.lock:
            entry = self.entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self.entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def peek(self, key: str) -> AdaptedLearner | None:
        """The entry, neither counted as a hit or a miss nor made more recent: for a
        second look at a key already counted (a server adapting a batch of misses, some of
        which another batch may have adapted meanwhile)."""
        with self.lock:
            entry = self.entries.get(key)
            return None if entry is None else entry[0]

    def put(self, key: str, adapted: AdaptedLearner) -> None:
        size = own_bytes(adapted)
        if size > self.max_bytes:
            return
        with self.lock:
            if key in self.entries:
                self.bytes -= self.entries.pop(key)[1]
            self.entries[key] = (adapted, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                self.bytes -= self.entries.popitem(last=False)[1][1]

    def stats(self) -> dict[str, int]:
        with self.lock:
            return {"entries": len(self.entries), "bytes": self.bytes,
                    "hits": self.hits, "misses": self.misses}


def own_bytes(adapted: AdaptedLearner) -> int:
    """Bytes of the adapted tensors that do not share storage with the initialisation."""
    shared = {t.untyped_storage().data_ptr() for t in adapted.learner.params.values()}
    return sum(t.nbytes for t in adapted.params.values()
               if t.untyped_storage().data_ptr() not in shared)
