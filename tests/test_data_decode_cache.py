"""ClassStore's decode cache: decoded classes shared through memory-mapped .npy files."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from metadist.config import ConfigError, absolute_paths, load_config
from metadist.data.decode_cache import SizeCap, key_name
from metadist.data.ingest.synthetic import make_synthetic
from metadist.data.store import ClassStore
from metadist.training.streams import open_streams

CLASSES = 6  # in the training split
SYNTHETIC = dict(classes=12, images_per_class=5, image_size=12, val_fraction=0.25,
                 test_fraction=0.25)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("decode_cache") / "syn"
    return make_synthetic(out, **SYNTHETIC)


@pytest.fixture()
def split(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source / "train", tmp_path / "train"))


def no_decoding(store: ClassStore) -> ClassStore:
    def fail(base: int) -> torch.Tensor:
        raise AssertionError(f"class {base} was decoded, not read from the cache")

    store._decode_class = fail
    return store


def entries(cache: Path) -> dict[str, int]:
    return {str(p.relative_to(cache)): p.stat().st_mtime_ns for p in cache.rglob("*.npy")}


def test_a_second_store_reads_what_the_first_decoded(split: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    plain = ClassStore(split)
    assert plain.num_classes == CLASSES
    first = ClassStore(split, decode_cache=cache)
    for c in range(CLASSES):
        assert first.load_class(c).equal(plain.load_class(c))
    written = entries(cache)
    assert len(written) == CLASSES and len({Path(p).parent for p in written}) == 1
    assert {(cache / p).stat().st_mode & 0o777 for p in written} == {0o644}  # others may read

    second = no_decoding(ClassStore(split, decode_cache=cache))
    for c in range(CLASSES):
        images = second.load_class(c)
        assert images.dtype == torch.uint8 and images.equal(plain.load_class(c))
    assert entries(cache) == written  # read, never rewritten


def test_key_follows_preprocessing_and_content(split: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    ClassStore(split, decode_cache=cache).load_class(0)
    small = ClassStore(split, image_size=8, decode_cache=cache)
    assert small.decode_cache != ClassStore(split, decode_cache=cache).decode_cache
    assert small.load_class(0).shape[-1] == 8  # not the 12-pixel entry
    grey = ClassStore(split, channels=3, decode_cache=cache)
    assert grey.decode_cache not in {small.decode_cache,
                                     ClassStore(split, decode_cache=cache).decode_cache}
    assert grey.load_class(0).shape[1] == 3
    # New shards (a re-conversion) mean new sha256s in the manifest, so a new key.
    other = make_synthetic(tmp_path / "other", **SYNTHETIC, seed=1)
    assert ClassStore(other / "train", decode_cache=cache).decode_cache \
        != ClassStore(split, decode_cache=cache).decode_cache


def test_a_bad_entry_is_decoded_again(
    split: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    plain = ClassStore(split)
    key = ClassStore(split, decode_cache=cache).decode_cache
    key.mkdir(parents=True)
    (key / "0.npy").write_bytes(b"not an array")  # e.g. a file truncated by hand
    np.save(key / "1.npy", np.zeros((2, 1, 12, 12), dtype=np.uint8))  # wrong shape
    np.save(key / "2.npy", np.zeros((5, 1, 12, 12), dtype=np.float32))  # wrong dtype
    store = ClassStore(split, decode_cache=cache)
    with caplog.at_level(logging.WARNING, logger="metadist.data.store"):
        for c in range(3):
            assert store.load_class(c).equal(plain.load_class(c))
    for c in range(3):
        assert f"{key / f'{c}.npy'}" in caplog.text
    assert "unreadable decode-cache entry" in caplog.text
    assert "holds uint8 (2, 1, 12, 12)" in caplog.text and "float32" in caplog.text
    # Replaced by good entries: the next store reads them.
    fresh = no_decoding(ClassStore(split, decode_cache=cache))
    for c in range(3):
        assert fresh.load_class(c).equal(plain.load_class(c))


def test_a_changed_entry_fails_its_checksum_and_is_decoded_again(
    split: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The shard checks cannot see the cache: an entry whose pixels were changed (by hand,
    # by a bad disk, by another writer) must not be fed to training.
    cache = tmp_path / "cache"
    plain = ClassStore(split)
    first = ClassStore(split, decode_cache=cache)
    first.load_class(0)
    entry = first.decode_cache / "0.npy"
    raw = bytearray(entry.read_bytes())
    raw[200] ^= 0xFF  # a pixel, past the .npy header: same shape, same dtype
    entry.write_bytes(bytes(raw))
    np.save(first.decode_cache / "1.npy", plain.load_class(1).numpy())  # no checksum
    store = ClassStore(split, decode_cache=cache)
    with caplog.at_level(logging.WARNING, logger="metadist.data.store"):
        assert store.load_class(0).equal(plain.load_class(0))
        assert store.load_class(1).equal(plain.load_class(1))
    assert caplog.text.count("does not match its checksum") == 2
    assert str(entry) in caplog.text
    fresh = no_decoding(ClassStore(split, decode_cache=cache))  # rebuilt: read, not decoded
    assert fresh.load_class(0).equal(plain.load_class(0))


def test_an_unwritable_cache_falls_back_to_memory(
    split: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    plain = ClassStore(split)
    store = ClassStore(split, decode_cache=blocked)
    with caplog.at_level(logging.WARNING, logger="metadist.data.store"):
        for c in range(CLASSES):
            assert store.load_class(c).equal(plain.load_class(c))
    warnings = [r for r in caplog.records if "cannot write" in r.getMessage()]
    assert len(warnings) == 1 and str(blocked) in warnings[0].getMessage()
    assert blocked.read_text() == "not a directory"
    assert not list(tmp_path.glob("**/*.tmp"))


def entry_bytes(cache: Path) -> int:
    sizes = {p.stat().st_size for p in cache.rglob("*.npy")}
    assert len(sizes) == 1  # the synthetic classes all hold 5 images
    return sizes.pop()


def age(path: Path, seconds: float) -> None:
    stamp = time.time() - seconds
    os.utime(path, (stamp, stamp))


def test_the_cap_evicts_the_least_recently_used_entries(split: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    plain = ClassStore(split)
    ClassStore(split, decode_cache=cache).load_class(0)
    size = entry_bytes(cache)
    cap = 3.5 * size / 1e9  # room for three entries
    key = ClassStore(split, decode_cache=cache).decode_cache
    # An entry of another dataset (or image size) no one has read for a day.
    stale = cache / "train-12px-1ch-0123456789abcdef" / "0.npy"
    stale.parent.mkdir()
    foreign = cache / "someone-else" / "0.npy"  # not a metadist key: never touched
    foreign.parent.mkdir()
    shutil.copy(key / "0.npy", foreign)
    age(foreign, 86400)
    shutil.copy(key / "0.npy", stale)
    age(stale, 86400)
    first = ClassStore(split, decode_cache=cache, decode_cache_max_gb=cap)
    for c in (1, 2):
        first.load_class(c)
    assert not stale.exists() and foreign.exists()  # three fit, four do not: the oldest went
    for c, seconds in ((0, 300), (1, 200), (2, 100)):
        age(key / f"{c}.npy", seconds)
    # A reader of class 0 marks it used, so class 1 is now the least recently used.
    reader = no_decoding(ClassStore(split, decode_cache=cache, decode_cache_max_gb=cap))
    assert reader.load_class(0).equal(plain.load_class(0))
    ClassStore(split, decode_cache=cache, decode_cache_max_gb=cap).load_class(3)
    assert sorted(entries(cache)) == ["someone-else/0.npy"] + [
        f"{key.name}/{c}.npy" for c in (0, 2, 3)]
    # An evicted class is decoded again, not lost.
    assert ClassStore(split, decode_cache=cache, decode_cache_max_gb=cap).load_class(1) \
        .equal(plain.load_class(1))
    assert len(entries(cache)) == 4 and foreign.exists()


def test_the_cap_keeps_the_entry_just_written_and_clears_dead_writes(
    split: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    key = ClassStore(split, decode_cache=cache).decode_cache
    key.mkdir(parents=True)
    dead = key / ".4-dead.tmp"  # a writer killed before its rename, two hours ago
    dead.write_bytes(b"x" * 100)
    age(dead, 7200)
    live = key / ".5-live.tmp"  # a write in flight in another process
    live.write_bytes(b"x" * 100)
    store = ClassStore(split, decode_cache=cache, decode_cache_max_gb=1e-9)  # 1 byte
    with caplog.at_level(logging.WARNING, logger="metadist.data.store"):
        for c in range(3):
            store.load_class(c)
            assert list(entries(cache)) == [f"{key.name}/{c}.npy"]  # never the new one
    assert not dead.exists() and live.exists()
    warnings = [r.getMessage() for r in caplog.records if "evicted" in r.getMessage()]
    assert len(warnings) == 1  # once per process, not once per eviction
    assert "data.decode_cache_max_gb" in warnings[0] and str(cache) in warnings[0]


ENTRY = 100  # bytes of each entry below
CAP = 100_000  # room for 1,000 of them; SizeCap's slack, 1% of it: 10


def write_entry(key: Path, i: int) -> Path:
    path = key / f"{i}.npy"
    path.write_bytes(bytes(ENTRY))
    stamp = 1_700_000_000_000_000_000 + i * 1_000_000  # entry i used at ms i
    os.utime(path, ns=(stamp, stamp))
    return path


def held(key: Path) -> int:
    return ENTRY * len(os.listdir(key))


def test_a_single_writer_scans_once_per_slack_and_holds_the_cap(tmp_path: Path) -> None:
    key = tmp_path / key_name("train", 28, 1, "0" * 16)
    key.mkdir()
    cap = SizeCap(tmp_path, CAP)
    writes = 3_000
    for i in range(writes):
        cap.wrote(write_entry(key, i), ENTRY)
        assert held(key) <= CAP  # after every write, not only after a scan
    # Filling, a scan each 10 writes; full, each eviction makes room for the next 10.
    assert writes / 11 - 2 <= cap.scans <= writes / 10 + 1
    left = sorted(int(name.split(".")[0]) for name in os.listdir(key))
    assert left == list(range(writes - len(left), writes))  # the most recently used
    assert held(key) >= CAP - cap.slack - ENTRY  # it evicts down to 99%, no further


def test_concurrent_writers_each_go_over_by_at_most_the_slack(tmp_path: Path) -> None:
    key = tmp_path / key_name("train", 28, 1, "0" * 16)
    key.mkdir()
    writers = [SizeCap(tmp_path, CAP) for _ in range(3)]  # processes sharing the cache
    over = 0
    for i in range(3_000):
        writers[i % 3].wrote(write_entry(key, i), ENTRY)
        over = max(over, held(key) - CAP)
    # Each writer cannot see what the other two wrote since its last scan.
    assert 0 < over <= 2 * writers[0].slack
    # More than one per 10 writes (a scan that leaves another's writes near the cap is
    # followed by another at the next write), still far fewer than one per write.
    assert sum(w.scans for w in writers) <= 3_000 / 5


def test_a_store_under_a_roomy_cap_scans_once(split: Path, tmp_path: Path) -> None:
    store = ClassStore(split, decode_cache=tmp_path / "cache", decode_cache_max_gb=1.0)
    for c in range(CLASSES):
        store.load_class(c)
    assert len(entries(tmp_path / "cache")) == CLASSES
    assert store._size_cap.scans == 1  # its first write's: nothing written since comes near


def test_a_cap_needs_a_cache_and_a_positive_size(split: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="decode_cache is not set"):
        ClassStore(split, decode_cache_max_gb=1.0)
    with pytest.raises(ValueError, match="must be > 0"):
        ClassStore(split, decode_cache=tmp_path, decode_cache_max_gb=0)
    base = ["data.dataset=sinusoid"]
    with pytest.raises(ConfigError, match="data.decode_cache is not set"):
        load_config(None, base + ["data.decode_cache_max_gb=2"])
    with pytest.raises(ConfigError, match=r"data.decode_cache_max_gb=-1.0 must be > 0"):
        load_config(None, base + ["data.decode_cache=c", "data.decode_cache_max_gb=-1"])


def test_config_key_reaches_the_streams(source: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, [f"data.dataset={source}", "data.decode_cache=cache",
                             "data.ways=2", "data.shots=1", "data.queries=1"])
    # A relative directory is made absolute before a job or trial runs elsewhere.
    assert absolute_paths(cfg)["data.decode_cache"] == str(tmp_path / "cache")
    streams = open_streams(cfg.data, train_seed=0, eval_seed=0)
    streams.train.episode(0)
    assert len(entries(tmp_path / "cache")) == 2  # the episode's two classes
    # With a cap of one entry's size, the second class evicts the first.
    cap = entry_bytes(tmp_path / "cache") / 1e9
    capped = load_config(None, [f"data.dataset={source}", "data.decode_cache=capped",
                                "data.ways=2", "data.shots=1", "data.queries=1",
                                f"data.decode_cache_max_gb={cap}"])
    open_streams(capped.data, train_seed=0, eval_seed=0).train.episode(0)
    assert len(entries(tmp_path / "capped")) == 1
