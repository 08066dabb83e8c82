"""Datasets on an object store: a real S3 API (moto's server, on loopback) serving a real
Omniglot conversion, read through the same code path as a local directory.

The dataset is uploaded with ``pyarrow.fs.copy_files``; the readers see only its URI,
``s3://metadist/omniglot?endpoint_override=127.0.0.1:PORT&scheme=http``, and take their
credentials from the environment, as they would from a real S3 bucket.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from metadist.config import DataConfig, load_config
from metadist.data import ClassStore, DatasetInfo, EpisodeSampler, Manifest
from metadist.data.location import Location
from metadist.training.streams import open_streams

moto_server = pytest.importorskip("moto.server", reason="moto[server] is in the dev extra")

BUCKET = "metadist"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never wait on an instance-metadata lookup
}


@dataclass
class S3:
    fs: pafs.S3FileSystem  # for the test's own uploads and tampering
    endpoint: str

    def uri(self, key: str) -> str:
        return f"s3://{BUCKET}/{key}?endpoint_override={self.endpoint}&scheme=http"

    def copy(self, src: str, dst: str) -> str:
        """Copy prefix ``src`` to ``dst`` inside the bucket; the URI of the copy."""
        pafs.copy_files(f"{BUCKET}/{src}", f"{BUCKET}/{dst}", self.fs, self.fs)
        return self.uri(dst)


@pytest.fixture(scope="module")
def s3(omniglot_small: Path) -> Iterator[S3]:
    with pytest.MonkeyPatch.context() as env:
        for key, value in CREDENTIALS.items():
            env.setenv(key, value)
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint = f"{host}:{port}"
            fs = pafs.S3FileSystem(
                endpoint_override=endpoint, scheme="http", allow_bucket_creation=True
            )
            fs.create_dir(BUCKET)
            pafs.copy_files(
                str(omniglot_small), f"{BUCKET}/omniglot",
                source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs,
            )
            yield S3(fs, endpoint)
        finally:
            server.stop()


def data_config(dataset: str) -> DataConfig:
    return DataConfig(dataset=dataset, ways=5, shots=1, queries=2)


def assert_same_episode(a, b) -> None:
    for name, x, y in zip(a._fields, a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x, y), name


# --- locations ---------------------------------------------------------------------------


def test_location_names_hide_credentials_and_options(tmp_path: Path) -> None:
    uri = "s3://KEY:SECRET@bucket/data/omniglot/?endpoint_override=127.0.0.1:9&scheme=http"
    loc = Location.of(uri)
    assert isinstance(loc.fs, pafs.S3FileSystem)
    assert loc.path == "bucket/data/omniglot"
    assert str(loc / "train" / "manifest.json") == "s3://bucket/data/omniglot/train/manifest.json"
    copy = pickle.loads(pickle.dumps(loc / "train"))  # what a worker or a Ray actor gets
    assert copy.path == "bucket/data/omniglot/train" and copy.fs.equals(loc.fs)

    local = Location.of(tmp_path)
    assert isinstance(local.fs, pafs.LocalFileSystem) and str(local / "x") == str(tmp_path / "x")
    assert Location.of(f"file://{tmp_path}").path == tmp_path.as_posix()
    for bad in ("..", "a/b", "s3://bucket/x", "C:x", ""):
        with pytest.raises(ValueError, match="not a plain file name"):
            loc / bad
    with pytest.raises(ValueError, match="dataset location nope://bucket/x"):
        Location.of("nope://KEY:SECRET@bucket/x")


# --- same episodes from S3 and from disk --------------------------------------------------


def test_s3_streams_equal_local_streams(s3: S3, omniglot_small: Path) -> None:
    uri = s3.uri("omniglot")
    remote = open_streams(data_config(uri), train_seed=3, eval_seed=4)  # verifies sha256
    local = open_streams(data_config(str(omniglot_small)), train_seed=3, eval_seed=4)
    assert remote.preprocessing == local.preprocessing
    assert str(remote.train.store.split_dir) == f"s3://{BUCKET}/omniglot/train"
    for stream in ("train", "val", "test"):
        a, b = getattr(remote, stream), getattr(local, stream)
        assert a.store.class_names == b.store.class_names
        for i in (0, 1, 17):
            assert_same_episode(a.episode(i), b.episode(i))
    for split in ("train", "val", "test"):
        assert Manifest.load(s3.uri(f"omniglot/{split}/manifest.json")) == Manifest.load(
            omniglot_small / split / "manifest.json"
        )
    info = json.loads((omniglot_small / "dataset.json").read_text())
    assert DatasetInfo.load(s3.uri("omniglot/dataset.json")).to_dict() == info


def _load_in_child(store: ClassStore, classes: list[int], out: multiprocessing.Queue) -> None:
    torch.set_num_threads(1)
    inherited = sorted(store._files)  # fork: the parent's open shards; spawn: none
    # numpy, not tensors: torch would share tensor memory through the exiting child.
    images = [store.load_class(c).numpy() for c in classes]
    out.put((inherited, store._pid == os.getpid(), images))


@pytest.mark.parametrize("start", ["spawn", "fork"])
def test_store_travels_to_other_processes(s3: S3, start: str) -> None:
    # spawn: the store arrives pickled and resolves its filesystem and credentials anew
    # (as a Ray actor does); fork: the child inherits the parent's open shards and must
    # open its own.
    store = ClassStore(s3.uri("omniglot/val"), verify=False, max_cached_classes=0)
    classes = [0, 21, 45]
    expected = [store.load_class(c) for c in classes]  # opens the shard here first
    assert store._files
    blob = pickle.dumps(store)
    assert b"test" not in blob and len(blob) < 20_000  # no credentials, no cache travel
    ctx = multiprocessing.get_context(start)
    out = ctx.Queue()
    child = ctx.Process(target=_load_in_child, args=(store, classes, out))
    child.start()
    try:
        inherited, own_pid, got = out.get(timeout=120)
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    assert inherited == (["shard-00000.parquet"] if start == "fork" else []) and own_pid
    for x, y in zip(got, expected, strict=True):
        assert torch.equal(torch.from_numpy(x), y)


def test_pipeline_actors_read_from_s3(s3: S3, omniglot_small: Path) -> None:
    # Ray actors get the pickled Location (filesystem options, no handles) and take their
    # credentials from the environment they inherit from the driver.
    import ray

    from metadist.runners.pipeline import EpisodePipeline

    task = dict(ways=5, shots=1, queries=3, seed=11)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with EpisodePipeline(
            s3.uri("omniglot/val"), **task, preprocessing=None, meta_batch_size=4,
            num_actors=1, prefetch=2,
        ) as pipeline:
            assert str(pipeline.split_dir) == f"s3://{BUCKET}/omniglot/val"
            batches = [pipeline.get(t) for t in range(2)]
    finally:
        ray.shutdown()
    sampler = EpisodeSampler(ClassStore(omniglot_small / "val"), **task)
    for t, batch in enumerate(batches):
        assert_same_episode(batch, sampler.meta_batch(t, 4))


# --- tampering and traversal --------------------------------------------------------------


def test_tampered_shard_on_s3_fails_the_check(s3: S3) -> None:
    uri = s3.copy("omniglot/val", "tampered/val")
    shard = f"{BUCKET}/tampered/val/shard-00000.parquet"
    with s3.fs.open_input_stream(shard) as f:
        raw = bytearray(f.read())
    raw[len(raw) // 2] ^= 0xFF
    with s3.fs.open_output_stream(shard) as f:
        f.write(bytes(raw))
    name = f"s3://{BUCKET}/tampered/val/shard-00000.parquet"
    with pytest.raises(ValueError, match=f"{name}: sha256 .* does not match .*manifest.json"):
        ClassStore(uri)
    s3.fs.delete_file(shard)
    with pytest.raises(ValueError, match=f"{name}: shard listed in .* is missing"):
        ClassStore(uri)
    with pytest.raises(FileNotFoundError, match=f"s3://{BUCKET}/nothing/manifest.json"):
        ClassStore(s3.uri("nothing"))
    with pytest.raises(FileNotFoundError, match=f"data.dataset=s3://{BUCKET}/nothing: no such"):
        open_streams(data_config(s3.uri("nothing")), train_seed=0, eval_seed=0)


@pytest.mark.parametrize(
    "name",
    ["../shard-00000.parquet", f"s3://{BUCKET}/outside/shard-00000.parquet", "s3:x.parquet"],
)
def test_s3_manifest_cannot_point_outside_its_split(s3: S3, name: str) -> None:
    # A shard that really exists beside the split (one level up) must still never be read.
    uri = s3.copy("omniglot/val", "traversal/val")
    s3.fs.copy_file(
        f"{BUCKET}/traversal/val/shard-00000.parquet", f"{BUCKET}/traversal/shard-00000.parquet"
    )
    manifest = f"{BUCKET}/traversal/val/manifest.json"
    with s3.fs.open_input_stream(manifest) as f:
        data = json.loads(f.read())
    for entry in data["classes"]:
        entry["shard"] = name
    data["shards"][0]["file"] = name
    with s3.fs.open_output_stream(manifest) as f:
        f.write(json.dumps(data).encode())
    with pytest.raises(ValueError, match="not a plain file name") as info:
        ClassStore(uri)
    assert "shards[0].file" in str(info.value)


# --- training ---------------------------------------------------------------------------


def test_training_reads_the_dataset_from_s3(s3: S3, omniglot_small: Path, tmp_path: Path) -> None:
    from metadist.training.loop import train

    def run(dataset: str, out: Path) -> dict:
        cfg = load_config(
            "configs/omniglot_5w1s_maml.yaml",
            [
                f"data.dataset={dataset}", "train.steps=2", "algorithm.meta_batch_size=2",
                "data.queries=2", "eval.episodes=4", "eval.batch_size=2", "train.val_every=0",
                "tracking.enabled=false", "train.progress=false", "train.inner_loop=loop",
                f"train.output_dir={out}",
            ],
        )
        return train(cfg)

    def losses(result: dict) -> list[float]:
        history = json.loads((Path(result["run_dir"]) / "history.json").read_text())
        return [record["train_loss"] for record in history]

    remote = run(s3.uri("omniglot"), tmp_path / "s3")
    local = run(str(omniglot_small), tmp_path / "local")
    # Same episodes, same seed: the same run, whichever store the shards came from.
    assert len(losses(remote)) == 2 and losses(remote) == losses(local)
    assert (remote["metric"], remote["mean"]) == (local["metric"], local["mean"])
    assert s3.uri("omniglot") in (Path(remote["run_dir"]) / "config.yaml").read_text()
