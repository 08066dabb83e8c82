"""An MLflow server lost in the middle of a run: training goes on, the user is told, and
the metrics logged while it was away reach it once it is back; runs started together on a
fresh local store; the code state a run names; a terminated run ends KILLED; the kind of
experiment the MLflow UI is told it is."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from conftest import free_port, sigterm_after_first_step, start_mlflow_server, stop_mlflow_server

from metadist.config import load_config
from metadist.launch.run import tracked_training
from metadist.tracking import (
    EXPERIMENT_KIND,
    MODEL_TRAINING,
    MLflowTracker,
    git_commit,
    git_uncommitted,
    run_tags,
)
from metadist.training.loop import train

ROOT = Path(__file__).resolve().parents[1]


def test_a_server_lost_mid_run_does_not_stop_training(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port)
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
            stop_mlflow_server(server)
        if step == 50:
            server = start_mlflow_server(tmp_path, port)
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
        # An experiment the server created (set_experiment) is a model-training one too.
        experiment = client.get_experiment(run.info.experiment_id)
        assert experiment.tags[EXPERIMENT_KIND] == MODEL_TRAINING
    finally:
        stop_mlflow_server(server)


def test_runs_started_at_once_on_a_fresh_sqlite_store_all_get_tracked(tmp_path):
    """MLflow creates and migrates a SQLite store's tables on first use; without a lock,
    two runs started together on a fresh store fail in that migration."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = (
        "from metadist.config import load_config\n"
        "from metadist.tracking import MLflowTracker\n"
        f"config = load_config({str(ROOT / 'configs' / 'sinusoid_maml.yaml')!r}, "
        f"['tracking.tracking_uri={uri}'])\n"
        "with MLflowTracker(config) as tracker:\n"
        "    tracker.log_metrics({'loss': 1.0}, 1)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("metadist").experiment_id])
    assert len(runs) == 3
    assert all(r.data.metrics["loss"] == 1.0 for r in runs)


def test_a_run_from_an_edited_tree_names_the_edited_files(tmp_path):
    # Two records of one config that differ are explained by the machine or by the code;
    # the commit alone cannot say which when the tree was edited.
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    for name in ("metadist/algo.py", "configs/row.yaml", "README.md"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("a\n")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    package = tmp_path / "metadist"
    assert len(git_commit(package)) == 40 and git_uncommitted(package) == []
    (tmp_path / "metadist/algo.py").write_text("b\n")
    (tmp_path / "configs/row.yaml").write_text("b\n")
    (tmp_path / "README.md").write_text("b\n")  # not the code: not listed
    (tmp_path / "metadist/new.py").write_text("b\n")  # untracked: imported only by listed edits
    assert git_uncommitted(package) == ["configs/row.yaml", "metadist/algo.py"]
    outside = tmp_path.parent / f"{tmp_path.name}-no-git"
    outside.mkdir()
    assert git_commit(outside) == "unknown" and git_uncommitted(outside) == []
    # A run's tags never claim a clean tree they could not see (a job's shipped copy).
    config = load_config(ROOT / "configs" / "sinusoid_maml.yaml")
    assert run_tags(config, package)["git_uncommitted"] == "configs/row.yaml, metadist/algo.py"
    tags = run_tags(config, outside)
    assert tags["git_commit"] == "unknown" and tags["git_uncommitted"] == "unknown"


@pytest.mark.parametrize("entry", [["metadist.cli", "train"], ["metadist.worker"]],
                         ids=["metadist train", "python -m metadist.worker"])
def test_a_terminated_training_ends_its_mlflow_run_as_killed(tmp_path, entry):
    # A scheduler's preemption, `kill`, torchrun stopping a failed group and `ray job stop`
    # send SIGTERM; by default it ends the process with no cleanup and the run would show
    # RUNNING in MLflow forever.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    # The store's tables exist before the run starts: this test polling a fresh store while
    # the run creates them collides in MLflow's migration.
    client.search_experiments()
    proc = subprocess.Popen(
        [sys.executable, "-m", *entry, str(ROOT / "configs" / "sinusoid_maml.yaml"),
         "train.steps=1000000", "train.log_every=1", "train.val_every=0",
         "train.checkpoint_every=0", "train.progress=false", f"train.output_dir={tmp_path}",
         f"tracking.tracking_uri={uri}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_id, err = sigterm_after_first_step(client, proc, timeout=180, exit_timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.metrics["train_loss"] > 0
    # ... and after the step in flight, which is checkpointed (checkpoint_every=0 above).
    [checkpoint] = tmp_path.glob("*/checkpoints/step-*.pt")
    assert f"continue with resume={checkpoint}" in err
    assert run.data.tags["resume_checkpoint"] == str(checkpoint)
    assert run.data.tags["stopped_after_step"] == str(int(checkpoint.stem.split("-")[1]))
    logged = client.list_artifacts(run.info.run_id, "checkpoints")
    assert [a.path for a in logged] == [f"checkpoints/{checkpoint.name}"]


def test_a_local_store_keeps_artifacts_beside_the_database_not_in_the_working_dir(
        tmp_path, monkeypatch):
    # A job on a cluster runs in a working directory the cluster deletes when it goes down:
    # an experiment created there must not put its artifacts (checkpoints, models) in it.
    store = tmp_path / "store"
    store.mkdir()
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    monkeypatch.chdir(job_dir)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    config = load_config(ROOT / "configs" / "sinusoid_maml.yaml",
                         [f"tracking.tracking_uri={uri}", "tracking.experiment=a/b c"])
    (job_dir / "note.txt").write_text("x")
    with MLflowTracker(config) as tracker:
        tracker.log_artifact(job_dir / "note.txt")
    run = mlflow.MlflowClient(uri).get_run(tracker.run_id)
    assert run.info.artifact_uri.startswith((store / "mlartifacts" / "a_b_c").as_uri())
    assert (store / "mlartifacts" / "a_b_c" / tracker.run_id / "artifacts" / "note.txt"
            ).is_file()
    assert not (job_dir / "mlruns").exists()


def test_experiments_are_model_training_ones_unless_their_owner_said_otherwise(tmp_path):
    # MLflow 3 keeps an experiment's kind, model training or GenAI (traces and evaluations
    # of LLM apps), in a tag; metadist's experiments hold training runs.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = load_config(ROOT / "configs" / "sinusoid_maml.yaml", [
        "train.steps=2", "train.log_every=1", "train.val_every=0", "eval.episodes=2",
        "train.progress=false", "train.checkpoint_every=0", f"train.output_dir={tmp_path}",
        f"tracking.tracking_uri={uri}",
    ])
    result = tracked_training(config)
    client = mlflow.MlflowClient(uri)
    run = client.get_run(result["mlflow_run_id"])
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "metadist"
    assert experiment.tags[EXPERIMENT_KIND] == MODEL_TRAINING == "custom_model_development"

    # One made before metadist tagged experiments, or by another tool, gets the tag at its
    # next metadist run; a kind its owner chose stays.
    untagged = client.create_experiment("untagged")
    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND: "genai_development"})
    for name in ("untagged", "chosen", "chosen"):
        named = load_config(ROOT / "configs" / "sinusoid_maml.yaml",
                            [f"tracking.tracking_uri={uri}", f"tracking.experiment={name}"])
        with MLflowTracker(named) as tracker:
            tracker.log_metrics({"loss": 1.0}, 1)
    assert client.get_experiment(untagged).tags[EXPERIMENT_KIND] == MODEL_TRAINING
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND] == "genai_development"


def test_credentials_in_the_tracking_uri_move_to_mlflow_s_own_variables(monkeypatch):
    import base64
    import http.server
    import threading

    from metadist.tracking import TrackingError, check_reachable, resolve_tracking_uri

    seen = []

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append(self.headers.get("Authorization"))
            good = "Basic " + base64.b64encode(b"alice:s3cr3t").decode()
            self.send_response(200 if self.headers.get("Authorization") == good else 401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:s3cr3t@127.0.0.1:{port}")
        uri = resolve_tracking_uri(load_config(ROOT / "configs" / "sinusoid_maml.yaml"))
        assert uri == f"http://127.0.0.1:{port}"
        assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice"
        assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cr3t"
        check_reachable(uri)  # authenticated as MLflow's client will be
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
        with pytest.raises(TrackingError) as raised:
            check_reachable(uri)
        assert "401" in str(raised.value) and "wrong" not in str(raised.value)
        assert len(seen) == 2
    finally:
        server.shutdown()
