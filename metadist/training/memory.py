"""The memory a meta-gradient takes, and the chunk of tasks that fits a budget
(``train.max_memory_gb``).

A worker runs its share of a meta-batch in sequential chunks (``meta_gradient``'s
``chunk``: vmap's tasks per call; the loop takes one task at a time), each chunk's outer
graph built, summed into the meta-gradient and freed before the next, so the sums do not
depend on the chunk and the memory does. With a budget, rank 0 measures at start-up the
peak memory of the meta-gradient of one real task, on the path and with the switches the
run uses, and every worker runs chunks of ``floor(budget / one task's peak)`` tasks (at
most its share). A chunk's peak grows linearly with its tasks from a part that does not
(the parameters, the summed meta-gradient), so c tasks take at most c times one task's
peak: the rule picks no chunk over the budget (the allocator's fragmentation aside), and
it may pick a smaller one than would fit. Validation and the meta-test run in the same
chunks.

What is measured: on CUDA, ``torch.cuda.max_memory_allocated`` over what was allocated
before (tensors alone: the caching allocator's reserve and the CUDA context come on top);
on a CPU, the growth of the process's resident set (RSS): its high-water mark, reset just
before (``/proc/self/clear_refs``, Linux), over its RSS after ``malloc_trim`` has given
freed heap back to the system. A process that cannot reset its high-water mark samples
its RSS every millisecond instead, which may miss a peak shorter than that.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

GB = 1e9  # as data.decode_cache_max_gb: 10^9 bytes


class MemoryBudgetError(ValueError):
    """``train.max_memory_gb`` is below what one task's meta-gradient needs."""


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int, str]:
    """``fn()``'s result, the peak memory in bytes it took beyond what was held before,
    and what was measured (see the module's docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, max(torch.cuda.max_memory_allocated(device) - before, 0), \
            "CUDA max_memory_allocated"
    _trim()
    before = _rss()
    if _reset_high_water_mark():
        out = fn()
        return out, max(_high_water_mark() - before, 0), "peak RSS growth"
    out, peak = _sampled(fn)
    return out, max(peak - before, 0), "peak RSS growth (sampled every 1 ms)"


def chunk_for_budget(budget_gb: float, one_task: int, tasks: int, what: str = "") -> int:
    """The most tasks per chunk, at most ``tasks``, whose meta-gradient stays within
    ``budget_gb`` when one task's peaks at ``one_task`` bytes; MemoryBudgetError naming the
    key and the measured need when not even one task fits."""
    budget = budget_gb * GB
    if one_task > budget:
        raise MemoryBudgetError(
            f"train.max_memory_gb={budget_gb:g} is below what one task's meta-gradient "
            f"needs: measured {one_task / GB:.3g} GB per task ({what or 'peak memory'}); "
            "raise it, set train.recompute_inner=true (second order: the inner steps are "
            "recomputed instead of kept) or train.recompute_query=true (the query's blocks "
            "are), use more workers (the budget is each worker's), or take smaller episodes")
    return max(1, min(tasks, int(budget // max(one_task, 1))))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _high_water_mark() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS to the current RSS (Linux >= 4.0)
        _high_water_mark()
        return True
    except OSError:
        return False


def _trim() -> None:
    """Give freed heap memory back to the system (glibc), so that RSS is what is live."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _sampled(fn: Callable[[], Any]) -> tuple[Any, int]:
    peak, done = [_rss()], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out = fn()
    finally:
        done.set()
        sampler.join()
    return out, max(peak[0], _rss())
