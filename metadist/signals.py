"""SIGTERM unwinds the process as Ctrl-C does.

``kill``, a scheduler preempting a job, ``torchrun`` stopping a failed group's other ranks
and ``ray job stop`` all send SIGTERM, whose default action ends the process on the spot:
no ``finally`` runs, so the MLflow run stays RUNNING forever and the episode pipeline's
actors and a local Ray are left to their own shutdown. Raised as ``SystemExit`` instead,
the run ends KILLED (as after Ctrl-C) and the process exits with 143 (128 + SIGTERM), the
status a shell or a scheduler expects from a terminated process.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


def _exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within this block SIGTERM raises ``SystemExit(143)``; the previous handler comes
    back after it. Only the main thread can install handlers: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
