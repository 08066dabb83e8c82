"""Episode pipeline: a pool of Ray actors that build meta-batches ahead of the trainer.

Each actor opens the split's Parquet shards itself (a ``ClassStore`` that decodes only the
classes its episodes need, and keeps them), samples episodes by index with an
``EpisodeSampler`` and returns them stacked as a ``MetaBatch`` through Ray's object store.
``EpisodePipeline`` keeps at most ``prefetch`` requests in flight, spread round-robin over
the actors, and hands them back strictly in step order.

Reproducibility: episode ``i`` depends only on (seed, i) (see ``metadist.data.episodes``),
and the global meta-batch of step ``t`` is episodes ``t*B .. t*B+B-1``, exactly
``EpisodeSampler.meta_batch(t, B)``. Worker ``rank`` of ``world_size`` takes the slice
``shard_bounds(B, rank, world_size)`` of it. So the data a trainer sees does not depend
on the number of actors, the prefetch depth or the number of workers: the ranks' shards,
concatenated in rank order, are the one-worker meta-batch.

Faults: an actor that dies (killed, OOM, crashed) is restarted by Ray (``max_restarts``)
and Ray retries its outstanding requests (``max_task_retries``); the stream continues
unchanged. An error raised while building an episode (a corrupt image, a broken shard) is
not retried: it surfaces as ``PipelineError`` naming the split, the episode indices and,
from the store's message, the shard and class.

The scheduling stays ours, a few lines, because ``ray.util.ActorPool`` does not fit: it
hands work to whichever actor is idle and cannot drop what is in flight, while a trainer
that asks for another step than the next (a resume, an evaluation) must discard the queue
and restart the stream there, and the queue must stay bounded by ``prefetch``.

The caller owns Ray: call ``ray.init`` before building a pipeline, ``ray.shutdown`` after.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from metadist.data.episodes import EpisodeSampler, MetaBatch, Preprocessing, stack_episodes
from metadist.data.location import Location
from metadist.data.store import ClassStore
from metadist.training.distributed import shard_bounds


class PipelineError(RuntimeError):
    """An episode could not be built (bad data, not a lost actor), or the pipeline cannot run."""


class EpisodeActor:
    """Builds episodes of one split by index. Run it as a Ray actor:
    ``ray.remote(num_cpus=0.25)(EpisodeActor).remote(split_dir, ...)``.

    Built from plain, picklable values. ``verify`` re-checks the shards' sha256 in the
    actor; the pipeline has already done that once in the driver, so it passes False.
    """

    def __init__(
        self,
        split_dir: str | Location,
        *,
        image_size: int,
        channels: int,
        invert: bool,
        mean: Sequence[float],
        std: Sequence[float],
        ways: int,
        shots: int,
        queries: int,
        seed: int,
        verify: bool = False,
        max_cached_classes: int | None = None,
        decode_cache: str | None = None,
        decode_cache_max_gb: float | None = None,
    ) -> None:
        # Two torch threads per process on a 2-core machine make every small op crawl
        # under contention; the actors' parallelism is the pool, not threads.
        torch.set_num_threads(1)
        self.store = ClassStore(
            split_dir, image_size=image_size, channels=channels, verify=verify,
            max_cached_classes=max_cached_classes, decode_cache=decode_cache,
            decode_cache_max_gb=decode_cache_max_gb,
        )
        self.sampler = EpisodeSampler(
            self.store, ways=ways, shots=shots, queries=queries, seed=seed,
            preprocessing=Preprocessing(image_size, channels, invert, tuple(mean), tuple(std)),
        )
        self.requests = 0
        self.busy_s = 0.0
        # Set in a process Ray started again after this actor died.
        self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self.started_at = time.time()  # wall clock, comparable across processes

    def episodes(self, indices: Sequence[int]) -> MetaBatch:
        """Episodes ``indices``, stacked along a leading task dimension, as
        ``EpisodeSampler.meta_batch`` stacks them."""
        t0 = time.perf_counter()
        self.requests += 1
        indices = [int(i) for i in indices]
        built = []
        try:
            for i in indices:
                try:
                    built.append(self.sampler.episode(i))
                except Exception as exc:
                    raise PipelineError(self._describe(indices, i, exc)) from None
            return stack_episodes(built)
        finally:
            self.busy_s += time.perf_counter() - t0

    def pid(self) -> int:
        return os.getpid()

    def stats(self) -> dict[str, float | int]:
        """``requests`` served, ``busy_s`` spent building them, ``cached_classes`` (decoded
        base classes held), ``started_at`` (``time.time()`` when the actor was ready),
        ``restarted`` (this process is a restart of the actor): since the last start."""
        return {
            "requests": self.requests,
            "busy_s": self.busy_s,
            "cached_classes": len(self.store._cache),
            "started_at": self.started_at,
            "restarted": self.restarted,
        }

    def _describe(self, indices: list[int], index: int, exc: Exception) -> str:
        store = self.store
        message = (
            f"split {store.split!r} ({store.split_dir}), episodes {_span(indices)}: episode "
            f"{index} failed: {type(exc).__name__}: {exc}"
        )
        if str(store.split_dir) in str(exc):
            return message  # the store's own message already names shard and class
        # Otherwise (e.g. an unreadable row group), find which class of the episode fails.
        try:
            classes = self.sampler.plan(index).classes
        except Exception:
            return message
        for c in classes:
            base, _ = store.base_class(int(c))
            try:
                store.load_examples(int(c), [0])
            except Exception:
                entry = store.manifest.classes[base]
                return (
                    f"{message} [reading class {entry.label!r} from shard "
                    f"{store.split_dir / entry.shard}, row group {entry.row_group}]"
                )
        return message


def _span(indices: Sequence[int]) -> str:
    if len(indices) > 2 and list(indices) == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}..{indices[-1]}"
    return str(list(indices))


@dataclass
class _Request:
    step: int
    indices: list[int]
    slot: int  # which actor of the pool
    ref: Any  # ray.ObjectRef of a MetaBatch


class EpisodePipeline:
    """This trainer's share of meta-batch ``t`` for ``t = start_step, start_step + 1, ...``.

    ``split_dir`` is one split of a converted dataset (``<dataset>/<split>``: a local path,
    a URI such as ``s3://bucket/omniglot/train``, or a ``Location``). The global
    meta-batch ``t`` is episodes ``t*meta_batch_size ..`` of the (``seed``) stream, exactly
    ``EpisodeSampler.meta_batch(t, meta_batch_size)``; worker ``rank`` of ``world_size``
    gets the tasks ``shard_bounds(meta_batch_size, rank, world_size)`` of it. A rank with
    no task gets MetaBatches with a task dimension of 0 and starts no actor.

    ``num_actors`` actors of ``actor_cpus`` logical CPUs each (fractional: light actors on
    a small machine must not starve the trainer of Ray CPUs) build the batches, at most
    ``prefetch`` requests ahead. ``preprocessing`` fixes image size, channels and
    normalisation (None: the manifest's recommendation). ``verify`` checks the shards'
    sha256 once, here. ``decode_cache``: a node-local directory the actors share decoded
    classes through (``ClassStore``); a replacement actor starts warm from it;
    ``decode_cache_max_gb`` caps it.
    ``max_restarts`` bounds how often Ray restarts each actor.

    Use ``get(step)`` or iterate (an endless stream); ``close()`` or a ``with`` block ends
    the actors. ``stats()`` says how long the trainer waited for data. One consumer per
    pipeline: it is not thread-safe.
    """

    def __init__(
        self,
        split_dir: str | Path | Location,
        *,
        ways: int,
        shots: int,
        queries: int,
        seed: int,
        preprocessing: Preprocessing | None,
        meta_batch_size: int,
        num_actors: int = 2,
        actor_cpus: float = 0.25,
        prefetch: int = 4,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
        verify: bool = True,
        max_cached_classes: int | None = None,
        decode_cache: str | None = None,
        decode_cache_max_gb: float | None = None,
        max_restarts: int = 10,
    ) -> None:
        for name, value, minimum in (
            ("meta_batch_size", meta_batch_size, 1),
            ("num_actors", num_actors, 1),
            ("prefetch", prefetch, 1),
            ("start_step", start_step, 0),
            ("max_restarts", max_restarts, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if not actor_cpus > 0:
            raise ValueError(f"actor_cpus must be > 0, got {actor_cpus!r}")
        if not ray.is_initialized():
            raise PipelineError(
                "Ray is not running: call ray.init(...) before building an EpisodePipeline "
                "(the caller owns Ray, the pipeline never starts or stops it)"
            )
        self.split_dir = Location.of(split_dir)
        # Every check (manifest vs shards, sha256, feasibility of ways/shots/queries) runs
        # once here, in the driver, so a bad dataset fails now with the store's message
        # rather than as an actor that dies in its constructor.
        store = ClassStore(
            self.split_dir,
            image_size=None if preprocessing is None else preprocessing.image_size,
            channels=None if preprocessing is None else preprocessing.channels,
            verify=verify,
        )
        sampler = EpisodeSampler(
            store, ways=ways, shots=shots, queries=queries, seed=seed,
            preprocessing=preprocessing,
        )
        self.split = store.split
        self.preprocessing = pre = sampler.preprocessing
        self.ways, self.shots, self.queries = sampler.ways, sampler.shots, sampler.queries
        self.seed = sampler.seed
        self.meta_batch_size = meta_batch_size
        self.rank, self.world_size = rank, world_size
        self.lo, self.hi = shard_bounds(meta_batch_size, rank, world_size)
        self.prefetch = prefetch
        self.max_restarts = max_restarts
        # Ray restarts a dead actor and retries the requests it held (-1: as often as the
        # restarts allow); an episode's own error is not retried (retry_exceptions off).
        self._actor_cls = ray.remote(num_cpus=actor_cpus, max_restarts=max_restarts,
                                     max_task_retries=-1)(EpisodeActor)
        self._actor_args = dict(
            image_size=pre.image_size, channels=pre.channels, invert=pre.invert,
            mean=list(pre.mean), std=list(pre.std), ways=self.ways, shots=self.shots,
            queries=self.queries, seed=self.seed, verify=False,
            max_cached_classes=max_cached_classes, decode_cache=decode_cache,
            decode_cache_max_gb=decode_cache_max_gb,
        )
        n_actors = num_actors if self.hi > self.lo else 0  # an idle rank needs no actor
        self._actors = [self._new_actor() for _ in range(n_actors)]
        self._pending: deque[_Request] = deque()  # in flight, in step order
        self._next_step = start_step  # what get() expects next
        self._next_submit = start_step
        self._wait_s = 0.0
        self._batches = 0
        self._max_in_flight = 0
        self._submitted = 0
        self._closed = False
        self._fill()  # start working now, while the trainer sets itself up

    # --- the trainer's side ---------------------------------------------------------------

    @property
    def tasks_per_batch(self) -> int:
        return self.hi - self.lo

    @property
    def actors(self) -> list[Any]:
        """The current actor handles (a replaced actor's slot holds its replacement)."""
        return list(self._actors)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def indices(self, step: int) -> list[int]:
        """The episode indices of this rank's share of meta-batch ``step``."""
        base = step * self.meta_batch_size
        return list(range(base + self.lo, base + self.hi))

    def get(self, step: int) -> MetaBatch:
        """This rank's share of meta-batch ``step``; blocks until it is ready.

        Steps are meant to be asked in order. Asking another step than the next one
        discards what is in flight and restarts the stream there.
        """
        if self._closed:
            raise PipelineError("the pipeline is closed")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        t0 = time.perf_counter()
        if step != self._next_step:
            self._discard()
            self._next_step = self._next_submit = step
        if self.tasks_per_batch == 0:
            batch = self._empty()
        else:
            self._fill()
            request = self._pending[0]
            assert request.step == step
            batch = self._result(request)
            self._pending.popleft()
        self._next_step = step + 1
        self._fill()  # keep `prefetch` requests working while the trainer trains
        self._wait_s += time.perf_counter() - t0
        self._batches += 1
        return batch

    def __iter__(self) -> Iterator[MetaBatch]:
        while True:
            yield self.get(self._next_step)

    def stats(self) -> dict[str, float | int]:
        """``wait_s``: seconds the trainer spent blocked in ``get`` (cumulative);
        ``batches``; ``actor_restarts`` (actors Ray has restarted, each counted once; asks
        the actors, after the work queued before); ``requests`` submitted; ``in_flight``
        now and ``max_in_flight`` ever (never above ``prefetch``)."""
        return {
            "wait_s": self._wait_s,
            "batches": self._batches,
            "actor_restarts": sum(bool(s["restarted"]) for s in self.actor_stats()),
            "requests": self._submitted,
            "in_flight": len(self._pending),
            "max_in_flight": self._max_in_flight,
        }

    def actor_stats(self) -> list[dict[str, float | int]]:
        """Each actor's ``EpisodeActor.stats()``; waits for the work queued before it."""
        return ray.get([actor.stats.remote() for actor in self._actors])

    def close(self) -> None:
        """Ends the actors; safe to call twice. Requests in flight are dropped, and an actor
        busy with one dies some milliseconds after this returns: it may still finish
        writing a decode-cache entry, which is harmless (entries appear whole, by rename)."""
        if self._closed:
            return
        self._closed = True
        self._discard()
        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # Ray already shut down, or the actor already gone
                pass
        self._actors = []

    def __enter__(self) -> EpisodePipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"EpisodePipeline({str(self.split_dir)!r}, {self.ways}-way {self.shots}-shot "
            f"{self.queries} queries, tasks [{self.lo}, {self.hi}) of {self.meta_batch_size}, "
            f"rank {self.rank}/{self.world_size}, actors={len(self._actors)}, "
            f"prefetch={self.prefetch})"
        )

    # --- requests -------------------------------------------------------------------------

    def _fill(self) -> None:
        """Submit requests in step order until ``prefetch`` are in flight (backpressure)."""
        if self.tasks_per_batch == 0:
            return
        while len(self._pending) < self.prefetch:
            step = self._next_submit
            slot = step % len(self._actors)  # round-robin, by step
            self._pending.append(self._submit(step, slot))
            self._next_submit += 1
        self._max_in_flight = max(self._max_in_flight, len(self._pending))

    def _discard(self) -> None:
        """Drop what is in flight (the refs' results are freed with them)."""
        for r in self._pending:
            try:
                ray.cancel(r.ref)
            except Exception:  # finished already, or Ray is gone
                pass
        self._pending.clear()

    def _submit(self, step: int, slot: int) -> _Request:
        indices = self.indices(step)
        ref = self._actors[slot].episodes.remote(indices)
        self._submitted += 1
        return _Request(step, indices, slot, ref)

    def _result(self, request: _Request) -> MetaBatch:
        try:
            return ray.get(request.ref)
        except ray.exceptions.RayActorError as err:  # dead for good: no restart left
            if err.actor_init_failed:
                raise PipelineError(
                    f"split {self.split!r} ({self.split_dir}): episode actor could not "
                    f"start, so episodes {_span(request.indices)} (step {request.step}) "
                    f"cannot be built: {err}"
                ) from None
            raise PipelineError(
                f"split {self.split!r} ({self.split_dir}): episode actor {request.slot} "
                f"died and Ray restarted it {self.max_restarts} times already "
                f"(max_restarts); last error: {_first_line(err)}"
            ) from None
        except ray.exceptions.RayTaskError as err:
            raise self._error(request, err) from None

    def _error(self, request: _Request, err: ray.exceptions.RayTaskError) -> PipelineError:
        cause = getattr(err, "cause", None)
        if isinstance(cause, PipelineError):  # the actor's own message: split, episodes, shard
            return PipelineError(f"{cause} (step {request.step})")
        detail = f"{type(cause).__name__}: {cause}" if cause is not None else _first_line(err)
        return PipelineError(
            f"split {self.split!r} ({self.split_dir}), episodes {_span(request.indices)} "
            f"(step {request.step}): {detail}"
        )

    def _new_actor(self) -> Any:
        # The Location, not its name: it carries the filesystem's options (endpoint, ...).
        return self._actor_cls.remote(self.split_dir, **self._actor_args)

    def _empty(self) -> MetaBatch:
        c, s = self.preprocessing.channels, self.preprocessing.image_size
        n, k, q = self.ways, self.shots, self.queries
        return MetaBatch(
            torch.empty(0, n * k, c, s, s),
            torch.empty(0, n * k, dtype=torch.int64),
            torch.empty(0, n * q, c, s, s),
            torch.empty(0, n * q, dtype=torch.int64),
        )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
