"""An MLflow server lost in the middle of a run: training goes on, the user is told, and
the metrics logged while it was away reach it once it is back."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from metadist.config import load_config
from metadist.tracking import MLflowTracker
from metadist.train import train

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store}",
         "--artifacts-destination", str(store.parent / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        cwd=store.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail("mlflow server did not start")


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, 9)  # gunicorn/uvicorn workers too
    proc.wait()


def test_a_server_lost_mid_run_does_not_stop_training(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    store, port = tmp_path / "mlflow.db", free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(store, port)
    config = load_config(ROOT / "configs" / "sinusoid_maml.yaml", [
        "train.steps=60", "train.log_every=10", "train.val_every=0", "eval.episodes=20",
        "train.progress=false", "train.checkpoint_every=0", f"train.output_dir={tmp_path}",
        f"tracking.tracking_uri={uri}",
    ])
    tracker = MLflowTracker(config)
    tracker.retry_every = 0.0  # retry at every log call, so the test need not wait
    log = tracker.log_metrics

    def outage(metrics, step):  # the server dies after step 20 and is back after step 40
        nonlocal server
        if step == 30:
            stop_server(server)
        if step == 50:
            server = start_server(store, port)
        log(metrics, step)

    tracker.log_metrics = outage
    try:
        with pytest.warns(UserWarning) as warned, tracker:
            result = train(config, tracker)
        messages = [str(w.message) for w in warned]
        assert any("training goes on" in m for m in messages)
        assert any("reachable again" in m for m in messages)
        assert result["steps"] == 60 and result["mean"] > 0

        from mlflow import MlflowClient

        client = MlflowClient(uri)
        steps = [m.step for m in client.get_metric_history(tracker.run_id, "train_loss")]
        assert sorted(steps) == [10, 20, 30, 40, 50, 60]  # the ones logged while down too
        run = client.get_run(tracker.run_id)
        assert run.info.status == "FINISHED" and "test_mse" in run.data.metrics
    finally:
        stop_server(server)
