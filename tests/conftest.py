"""Shared test fixtures: the real data sets beside the repository, and small converted
copies of them made once per test session."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Tests share 2 cores with each other's Ray/MLflow processes; one thread avoids
# oversubscription (each small op otherwise waits on a spinning sibling thread).
torch.set_num_threads(1)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def real_data(*parts: str) -> Path:
    """A path under the real data directory; fails (never skips) when it is missing."""
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    path = Path(os.environ.get("METADIST_DATA_DIR") or default).joinpath(*parts)
    if not path.exists():
        pytest.fail(
            f"real test data not found: {path} does not exist. Set METADIST_DATA_DIR to the "
            "folder holding omniglot/ and miniimagenet/ (default <repo>/../shared/data).",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def omniglot_small(tmp_path_factory) -> Path:
    """Real Omniglot: the authors' minimal background set 1 (136 characters) for training
    and validation, the full evaluation set held out for testing, with rotations."""
    from metadist.data.ingest import convert_omniglot

    out = tmp_path_factory.mktemp("omniglot") / "omniglot-small1"
    return convert_omniglot(
        real_data("omniglot"), out, split="background-evaluation", background="small1",
        val_classes=20, seed=0,
    )


@pytest.fixture(scope="session")
def mini_small_src(tmp_path_factory) -> Path:
    """Real miniImageNet in its images/ + CSV layout, a few classes of each split
    (``mini_subset``): RGB, unlike Omniglot. Read-only: copy it before changing it."""
    from mini_subset import make_small_mini

    return make_small_mini(tmp_path_factory.mktemp("mini") / "src")


@pytest.fixture(scope="session")
def mini_small(mini_small_src: Path) -> Path:
    """``mini_small_src`` converted to Parquet shards."""
    from metadist.data.ingest.convert import convert_miniimagenet

    return convert_miniimagenet(mini_small_src, mini_small_src.parent / "out")


@contextlib.contextmanager
def local_ray_cluster(state: Path, nodes: int):
    """A local multi-node Ray cluster of the test's own (its own state file, 1-CPU worker
    nodes, Ray's address variables cleared), always torn down."""
    from metadist.launch import cluster

    keys = (cluster.STATE_ENV, "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ[cluster.STATE_ENV] = str(state)
    for k in keys[1:]:
        os.environ.pop(k, None)
    try:
        yield cluster.up(
            nodes=nodes, cpus=1, state=state, log=lambda *a: None,
            # Not Ray's usual 6379/8265, which another Ray on this machine may take
            # between the check that they are free and their use.
            port=cluster.free_port(), dashboard_port=cluster.free_port())
    finally:
        if state.exists():
            cluster.down(state, log=lambda *a: None)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_mlflow_server(directory: Path, port: int) -> subprocess.Popen:
    """``mlflow server`` on loopback with a SQLite store and proxied artifacts (as the
    README starts it), answering /health; stop it with ``stop_mlflow_server``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
         f"sqlite:///{directory / 'mlflow.db'}", "--artifacts-destination",
         str(directory / "mlartifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=directory, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return proc
        except OSError:
            time.sleep(0.3)
    stop_mlflow_server(proc)
    pytest.fail("mlflow server did not answer within 90 s")


def stop_mlflow_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # its worker processes too
    proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(nproc: int, entry: list[str], args: list[str], run_dir: Path,
                 timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """``entry`` (``-m module`` or a script) on ``nproc`` torchrun ranks (real gloo groups,
    no Ray), from the repository root; with ``check`` it must exit 0 on every rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--standalone", *entry, *args, "--run-dir", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, env=env, timeout=timeout)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def run_workers(nproc: int, args: list[str], run_dir: Path) -> dict:
    """``metadist.worker`` on ``nproc`` torchrun ranks: its result."""
    run_torchrun(nproc, ["-m", "metadist.worker"], args, run_dir)
    return json.loads((run_dir / "result.json").read_text())


def sigterm_after_first_step(client, proc: subprocess.Popen, timeout: float,
                             exit_timeout: float) -> tuple[str, str]:
    """SIGTERM to the training ``proc`` once its MLflow run (experiment ``metadist``) has
    logged a step: that run's id and the process's stderr. Fails if ``proc`` ends or
    ``timeout`` seconds pass first."""
    deadline, runs = time.monotonic() + timeout, []
    try:
        while not (runs and runs[0].data.metrics.get("train_loss") is not None):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "training never logged a step"
            time.sleep(1)
            experiment = client.get_experiment_by_name("metadist")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=exit_timeout)
    finally:
        proc.kill()
    return runs[0].info.run_id, err


def child_runs(uri: str, parent_id: str) -> list:
    """The MLflow runs whose parent is ``parent_id`` (a sweep's trials)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    return client.search_runs([parent.info.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent_id}'")


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process descended from it."""
    from metadist.launch.cluster import all_procs

    tree, procs, grew = {pid}, all_procs(), True
    while grew:
        grew = False
        for p in procs:
            if p.ppid in tree and p.pid not in tree:
                tree.add(p.pid)
                grew = True
    return sorted(tree)


def omniglot_pngs(split: Path, classes: int) -> list[list[bytes]]:
    """The first 3 stored PNG files of each of the first ``classes`` classes of ``split``:
    real Omniglot characters as a client sends them."""
    import pyarrow.parquet as pq

    from metadist.data import Manifest

    out = []
    for entry in Manifest.load(split / "manifest.json").classes[:classes]:
        rows = pq.ParquetFile(split / entry.shard).read_row_group(
            entry.row_group, columns=["image"]).column("image").to_pylist()
        out.append([r["bytes"] for r in rows[:3]])
    return out


def listeners(pids: list[int]) -> list[tuple[str, str]]:
    """(local address, process name) of each TCP socket these processes listen on (``ss``)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        if any(f"pid={pid}," in line for pid in pids):
            local = line.split()[3]
            host = local.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")
            name = line.split('(("', 1)[1].split('"', 1)[0] if '(("' in line else "?"
            found.append((host, name))
    return found


def listening_addresses(pids: list[int]) -> list[str]:
    """The local addresses of the TCP sockets these processes listen on."""
    return [host for host, _ in listeners(pids)]


def listening_while_running(argv: list[str], *, cwd: Path, env: dict[str, str],
                            ready: Callable[[], bool], timeout: float = 240
                            ) -> list[tuple[str, str]]:
    """Run ``metadist ARGV``; once ``ready()``, (address, process name) of every socket that
    it and every process it started (a local Ray: GCS, raylet, workers, agents) listen on;
    then SIGTERM it."""
    proc = subprocess.Popen([sys.executable, "-m", "metadist.cli", *argv], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + timeout
        while not ready():
            if proc.poll() is not None or time.time() > deadline:
                out, err = proc.communicate()
                raise AssertionError(f"never ready (rc {proc.returncode}): {err[-3000:]}")
            time.sleep(0.5)
        time.sleep(3)  # the agents Ray starts beside the raylet come up last
        return listeners(process_tree(proc.pid))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
