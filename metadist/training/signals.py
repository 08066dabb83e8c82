"""SIGTERM unwinds the process as Ctrl-C does, and a training loop first finishes its step.

``kill``, a scheduler preempting a job, ``torchrun`` stopping a failed group's other ranks
and ``ray job stop`` all send SIGTERM, whose default action ends the process on the spot:
no ``finally`` runs, so the MLflow run stays RUNNING forever and the episode pipeline's
actors and a local Ray are left to their own shutdown. Raised as ``SystemExit`` instead,
the run ends KILLED (as after Ctrl-C) and the process exits with 143 (128 + SIGTERM), the
status a shell or a scheduler expects from a terminated process.

Raised mid-step, the steps since the last periodic checkpoint would be lost: a preempted
job would redo them. So the training loop defers the first SIGTERM to the end of the step
in flight, where the state is whole, checkpoints it, and then exits as above.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

TERMINATED = 128 + signal.SIGTERM  # the exit status of a process ended by SIGTERM


def _exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _can_install() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within this block SIGTERM raises ``SystemExit(143)``; the previous handler comes
    back after it. Only the main thread can install handlers: elsewhere this does nothing."""
    if not _can_install():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Stopped(SystemExit):
    """Training stopped early, at a whole step, because a SIGTERM asked it to: exits 143
    like any terminated process, and says where to resume from."""

    def __init__(self, step: int, checkpoint: str | None) -> None:
        super().__init__(TERMINATED)
        self.step, self.checkpoint = step, checkpoint


@contextlib.contextmanager
def sigterm_deferred(
    on_request: Callable[[], None] | None = None,
) -> Iterator[Callable[[], bool]]:
    """Within this block the first SIGTERM is only noted: the yielded ``requested()`` turns
    true (and ``on_request()`` is called, from the handler: it must only set a flag) and
    the caller stops where its state is whole. A second SIGTERM unwinds at once
    (``SystemExit(143)``), for whoever cannot wait for the step to end.

    A handler the program installed itself is left alone (``requested()`` stays false), as
    is everything off the main thread (Ray Tune's trials; Ray Train's workers get no
    signal, their driver passes the request on: ``metadist.runners.ray_train``)."""
    received: list[int] = []
    current = signal.getsignal(signal.SIGTERM) if _can_install() else None
    # ray.init's handler only exits at once (sys.exit), which this does after the step; and
    # after ray.shutdown it is Python's record only: the process has SIG_DFL again.
    ray = (getattr(current, "__module__", None) or "").startswith("ray.")
    if current not in (signal.SIG_DFL, _exit) and not ray:
        yield lambda: False
        return

    def note(signum: int, frame: object) -> None:
        if received:
            _exit(signum, frame)
        received.append(signum)
        if on_request is not None:
            on_request()

    signal.signal(signal.SIGTERM, note)
    try:
        yield lambda: bool(received)
    finally:
        signal.signal(signal.SIGTERM, current)
