"""EpisodePipeline on real Omniglot: same stream as EpisodeSampler whatever the actors,
prefetch or ranks; dead actors replaced; corrupt data reported, not retried; backpressure.

Each actor is a fresh process importing torch (seconds on 2 busy cores), so the tests
create few of them and build the pipelines of a test together, before the first get.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

from metadist.data import ClassStore, EpisodeSampler, MetaBatch
from metadist.data.schema import SHARD_SCHEMA
from metadist.data.store import CHECKSUM_MAGIC
from metadist.runners.pipeline import EpisodePipeline, PipelineError
from metadist.training.distributed import shard_bounds

TASK = dict(ways=5, shots=1, queries=3, seed=11)


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def split(omniglot_small: Path) -> Path:
    return omniglot_small / "val"  # 20 characters x 4 rotations: small, quick to decode


@pytest.fixture(scope="module")
def sampler(split: Path) -> EpisodeSampler:
    return EpisodeSampler(ClassStore(split), **TASK)


def pipeline(split: Path, **kwargs) -> EpisodePipeline:
    options = dict(TASK, preprocessing=None, meta_batch_size=4, num_actors=1, prefetch=2)
    options.update(kwargs)
    return EpisodePipeline(split, **options)


def assert_same(a: MetaBatch, b: MetaBatch) -> None:
    for name, x, y in zip(MetaBatch._fields, a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x, y), name


def cat(batches: list[MetaBatch]) -> MetaBatch:
    return MetaBatch(*(torch.cat(parts) for parts in zip(*batches, strict=True)))


def test_shard_bounds() -> None:
    assert [shard_bounds(8, r, 2) for r in range(2)] == [(0, 4), (4, 8)]
    assert [shard_bounds(5, r, 2) for r in range(2)] == [(0, 3), (3, 5)]
    assert [shard_bounds(10, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert [shard_bounds(3, r, 4) for r in range(4)] == [(0, 1), (1, 2), (2, 3), (3, 3)]
    assert shard_bounds(7, 0, 1) == (0, 7)
    for n in range(0, 13):
        for w in range(1, 6):
            bounds = [shard_bounds(n, r, w) for r in range(w)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    for bad in [(4, 2, 2), (4, -1, 2), (4, 0, 0), (-1, 0, 1)]:
        with pytest.raises(ValueError):
            shard_bounds(*bad)


def test_needs_ray(split: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(PipelineError, match=r"Ray is not running: call ray.init"):
        pipeline(split)


def test_stream_independent_of_actors_and_prefetch(
    ray_session: None, split: Path, sampler: EpisodeSampler
) -> None:
    with (
        pipeline(split, num_actors=1, prefetch=1) as one,
        pipeline(split, num_actors=2, prefetch=3, start_step=1) as two,
    ):
        for step in range(1, 4):
            expected = sampler.meta_batch(step, 4)
            assert_same(one.get(step), expected)  # asked out of order: restarts at `step`
            assert_same(two.get(step), expected)
        for step, batch in zip(range(4, 7), two, strict=False):  # iteration goes on in order
            assert_same(batch, sampler.meta_batch(step, 4))
        assert_same(one.get(0), sampler.meta_batch(0, 4))  # and back again
        stats = two.stats()
        assert stats["batches"] == 6 and stats["actor_restarts"] == 0
        assert stats["wait_s"] > 0 and stats["max_in_flight"] == 3
    with pytest.raises(PipelineError, match="closed"):
        one.get(1)


@pytest.mark.parametrize("size,world", [(5, 2), (3, 4)])
def test_rank_shards_concatenate_to_the_meta_batch(
    ray_session: None, split: Path, sampler: EpisodeSampler, size: int, world: int
) -> None:
    ranks = [
        pipeline(split, meta_batch_size=size, rank=r, world_size=world, start_step=1)
        for r in range(world)
    ]
    try:
        assert sum(p.tasks_per_batch for p in ranks) == size
        for step in (1, 2, 3):
            shards = [p.get(step) for p in ranks]
            assert [s.support_x.shape[0] for s in shards] == [p.tasks_per_batch for p in ranks]
            assert_same(cat(shards), sampler.meta_batch(step, size))
        if size < world:  # a rank with no task yields empty batches and starts no actor
            assert ranks[-1].tasks_per_batch == 0 and ranks[-1].actors == []
            assert shards[-1].query_x.shape == (0, 5 * 3, 1, 28, 28)
    finally:
        for p in ranks:
            p.close()


def test_dead_actors_are_restarted(ray_session: None, split: Path, sampler: EpisodeSampler) -> None:
    with pipeline(split, num_actors=2, prefetch=3) as pipe:
        for step in range(2):
            assert_same(pipe.get(step), sampler.meta_batch(step, 4))
        pid = ray.get(pipe.actors[0].pid.remote())
        ray.kill(pipe.actors[0], no_restart=False)  # an actor Ray may restart, as after a crash
        for step in range(2, 6):
            assert_same(pipe.get(step), sampler.meta_batch(step, 4))
        assert pipe.stats()["actor_restarts"] == 1
        assert ray.get(pipe.actors[0].pid.remote()) != pid

        pid = ray.get(pipe.actors[1].pid.remote())
        os.kill(pid, signal.SIGKILL)  # a crash, not a polite ray.kill
        for step in range(6, 10):
            assert_same(pipe.get(step), sampler.meta_batch(step, 4))
        assert pipe.stats()["actor_restarts"] == 2
        assert ray.get(pipe.actors[1].pid.remote()) != pid


def test_an_actor_out_of_restarts_raises_pipeline_error(
    ray_session: None, split: Path, sampler: EpisodeSampler
) -> None:
    with pipeline(split, num_actors=1, prefetch=2, max_restarts=0) as pipe:
        assert_same(pipe.get(0), sampler.meta_batch(0, 4))
        os.kill(ray.get(pipe.actors[0].pid.remote()), signal.SIGKILL)
        with pytest.raises(PipelineError, match=r"episode actor 0 died and Ray restarted it "
                                                r"0 times already \(max_restarts\)"):
            for step in range(1, 4):
                pipe.get(step)


def test_corrupt_image_raises_pipeline_error(
    ray_session: None, split: Path, sampler: EpisodeSampler, tmp_path: Path
) -> None:
    bad = Path(shutil.copytree(split, tmp_path / "val"))
    store = ClassStore(bad)

    def bases(episodes: range) -> set[int]:
        return {store.base_class(int(c))[0] for i in episodes for c in sampler.plan(i).classes}

    # Break an image of a class that meta-batch `step` draws and no earlier one does.
    step = next(s for s in range(1, 50) if bases(range(4 * s, 4 * s + 4)) - bases(range(4 * s)))
    base = min(bases(range(4 * step, 4 * step + 4)) - bases(range(4 * step)))
    entry = store.manifest.classes[base]
    path = bad / entry.shard
    pf = pq.ParquetFile(path)
    groups = [pf.read_row_group(g) for g in range(pf.num_row_groups)]
    pf.close()
    rows = groups[entry.row_group].to_pylist()
    rows[0]["image"]["bytes"] = b"\x89PNG\r\n\x1a\n" + b"\0" * 20
    groups[entry.row_group] = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
    with pq.ParquetWriter(path, SHARD_SCHEMA) as writer:
        for group in groups:
            writer.write_table(group, row_group_size=group.num_rows)

    with pytest.raises(ValueError, match="sha256"):  # verified by default
        pipeline(bad)
    with pipeline(bad, verify=False, prefetch=1) as pipe:
        for s in range(step):  # the stream is fine up to that class
            assert_same(pipe.get(s), sampler.meta_batch(s, 4))
        with pytest.raises(PipelineError) as info:
            pipe.get(step)
        assert pipe.stats()["actor_restarts"] == 0  # a data error is not retried
    message = str(info.value)
    assert f"{path}: class {entry.label!r}, row 0 of row group {entry.row_group}" in message
    assert "cannot decode image" in message
    assert f"split 'val' ({bad})" in message and f"episodes {4 * step}..{4 * step + 3}" in message


def test_backpressure(ray_session: None, split: Path, sampler: EpisodeSampler) -> None:
    with pipeline(split, num_actors=1, prefetch=2, meta_batch_size=2) as pipe:
        actor = pipe.actors[0]
        # Let the actor finish everything it was given: it is then idle, and still it has
        # been sent only `prefetch` requests.
        ray.wait([r.ref for r in pipe._pending], num_returns=2, timeout=120)
        assert pipe.in_flight == 2 and pipe.stats()["requests"] == 2
        assert ray.get(actor.stats.remote())["requests"] == 2
        for step in range(6):
            assert_same(pipe.get(step), sampler.meta_batch(step, 2))
            assert pipe.in_flight == 2  # refilled at once, never above prefetch
            assert pipe.stats()["requests"] == step + 1 + 2
        assert ray.get(actor.stats.remote())["requests"] == 6 + 2
        assert pipe.stats()["max_in_flight"] == 2


def finish_in_flight(pipe: EpisodePipeline) -> None:
    """Waits until the actors have finished the requests prefetched ahead: ``close`` kills
    them, and an actor dies some milliseconds after ``ray.kill`` returns, time enough to
    finish writing a cache entry, so a listing taken right after ``close`` could change."""
    refs = [r.ref for r in pipe._pending]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=120)
    assert len(ready) == len(refs)


def test_actors_share_a_decode_cache(
    ray_session: None, split: Path, sampler: EpisodeSampler, tmp_path: Path
) -> None:
    cache = tmp_path / "decoded"
    with pipeline(split, num_actors=2, prefetch=2, decode_cache=str(cache)) as pipe:
        for step in range(3):
            assert_same(pipe.get(step), sampler.meta_batch(step, 4))
        finish_in_flight(pipe)
    written = {p: p.stat().st_mtime_ns for p in cache.rglob("*.npy")}
    assert written  # the actors decoded into the shared directory
    # Fresh actors (a new run, a sweep's next trial) read those files instead of decoding:
    # a decoded class is always written, so unchanged files mean nothing was decoded.
    # (Prefetched steps past 2 may add entries: only those already there must stay.)
    with pipeline(split, num_actors=1, prefetch=2, decode_cache=str(cache)) as pipe:
        for step in range(3):
            assert_same(pipe.get(step), sampler.meta_batch(step, 4))
        finish_in_flight(pipe)
    assert {p: p.stat().st_mtime_ns for p in written} == written


def test_actors_keep_a_capped_decode_cache_under_its_cap(
    ray_session: None, split: Path, sampler: EpisodeSampler, tmp_path: Path
) -> None:
    cache = tmp_path / "decoded"
    # An Omniglot class: 20 images of 28x28, the .npy header, the checksum trailer.
    entry = 20 * 28 * 28 + 128 + len(CHECKSUM_MAGIC) + 32
    cap = 3 * entry  # far fewer than the 20 classes a meta-batch reads: entries are evicted
    with pipeline(split, num_actors=2, prefetch=2, decode_cache=str(cache),
                  decode_cache_max_gb=cap / 1e9) as pipe:
        for step in range(3):
            assert_same(pipe.get(step), sampler.meta_batch(step, 4))  # evictions lose nothing
        finish_in_flight(pipe)
    sizes = [p.stat().st_size for p in cache.rglob("*.npy")]
    assert sizes and set(sizes) == {entry} and sum(sizes) <= cap
