"""``metadist submit`` and ``metadist jobs`` against a real local multi-node Ray cluster
(``metadist cluster up --local``): a run tracked by a real MLflow server succeeds; jobs
are listed, inspected, followed and stopped; a request without the cluster's token is
refused; a run that cannot work fails within seconds with a message that says why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Imported before any test captures output: Ray's log handler keeps the stream it was
# created with.
from conftest import (
    child_runs,
    free_port,
    listening_addresses,
    local_ray_cluster,
    start_mlflow_server,
    stop_mlflow_server,
)

from metadist.cli import main
from metadist.launch import cluster as local_cluster
from metadist.launch.jobs import Jobs

ROOT = Path(__file__).resolve().parents[1]
SINUSOID = "configs/sinusoid_maml.yaml"
TINY = ["train.progress=false", "train.val_every=0", "eval.episodes=20", "train.log_every=10",
        "train.inner_loop=loop"]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the local cluster tracks its processes in /proc")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head and two 1-CPU worker nodes, recorded in a state file of the test's own."""
    with local_ray_cluster(tmp_path_factory.mktemp("cluster") / "local-cluster.json", 2) as c:
        yield c


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow"), port := free_port())
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        stop_mlflow_server(proc)


def test_a_submitted_run_succeeds_and_is_tracked_by_the_mlflow_server(
        cluster, mlflow_server, tmp_path, capsys):
    import mlflow

    uri, server = mlflow_server
    # The MLflow server listens on loopback only, like the cluster.
    assert set(listening_addresses(local_cluster.session_processes([server.pid]))) == {
        "127.0.0.1"}
    t0 = time.time()
    rc = main(["submit", SINUSOID, "workers=2", "train.steps=20", *TINY,
               f"train.output_dir={tmp_path / 'runs'}", "--mlflow-uri", uri])
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    assert "meta-test mse:" in out and "SUCCEEDED" in err
    job_id = out.split("submitted ", 1)[1].split()[0]
    print(f"submit -> SUCCEEDED in {time.time() - t0:.0f} s")

    run = mlflow.MlflowClient(tracking_uri=uri).search_runs(
        [mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name("metadist")
         .experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["workers"] == "2" and "test_mse" in run.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient(tracking_uri=uri).list_artifacts(
        run.info.run_id)}
    assert {"result.json", "config.yaml"} <= artifacts  # stored through the server

    assert main(["jobs", "status", job_id]) == 0
    assert f"{job_id}: SUCCEEDED" in capsys.readouterr().out
    assert main(["jobs", "list"]) == 0
    assert any(job_id in line and "SUCCEEDED" in line
               for line in capsys.readouterr().out.splitlines())
    assert main(["jobs", "logs", job_id]) == 0
    logs = capsys.readouterr().out
    assert "meta-test mse:" in logs and "Started training worker group of size 2" in logs


def test_a_running_job_is_stopped_after_a_checkpointed_step(cluster, tmp_path, capsys):
    # On Ray Train workers, which the stop does not signal: the driver passes it on. The
    # steps (400 second-order inner steps, ~5 s) take longer than Ray's default 3 s between
    # SIGTERM and SIGKILL, so the stop works only with the grace period submit gives.
    rc = main(["submit", SINUSOID, "workers=2", "train.steps=1000000", *TINY,
               "algorithm.inner_steps=400", "train.checkpoint_every=0",
               "tracking.enabled=false", f"train.output_dir={tmp_path / 'runs'}",
               "--no-follow"])
    out = capsys.readouterr().out
    assert rc == 0
    job_id = out.split("submitted ", 1)[1].split()[0]
    jobs = Jobs()
    # Rank 0 writes its pid just before it sets up: the first step is still to come.
    wait_for(lambda: any((tmp_path / "runs").glob("*/workers/rank-0.pid")), 120,
             "the job's workers to start")
    t0 = time.time()
    assert main(["jobs", "stop", job_id]) == 0
    assert f"{job_id}: STOPPED" in capsys.readouterr().out
    stopped_in = time.time() - t0
    assert stopped_in < 60  # a step and the exit, well within the grace period
    logs = jobs.logs(job_id)
    assert "the workers stopped after step " in logs, logs[-3000:]
    step = int(logs.split("the workers stopped after step ", 1)[1].split()[0])
    assert step == 1  # the step in flight when the stop came, not one more
    (checkpoint,) = (tmp_path / "runs").glob("*/checkpoints/step-*.pt")
    assert checkpoint.name == f"step-{step:07d}.pt", logs[-3000:]
    with capsys.disabled():
        print(f"stop -> STOPPED in {stopped_in:.0f} s, after step {step}")
    assert main(["jobs", "status", job_id]) == 1  # a stopped job is not a success
    capsys.readouterr()
    assert main(["jobs", "status", "raysubmit_nosuchjob"]) == 2
    assert "raysubmit_nosuchjob" in capsys.readouterr().err


def test_a_stopped_sweep_job_leaves_a_resumable_sweep(cluster, mlflow_server, tmp_path, capsys):
    # `jobs stop` on a `--tune` job: the sweep's driver gets the SIGTERM (and the job its
    # grace period), stops its trials and leaves the sweep resumable, not summarised.
    from mlflow import MlflowClient

    uri, _ = mlflow_server
    rc = main(["submit", "configs/tune_sinusoid_maml.yaml", "--tune", "train.steps=400",
               "train.val_every=50", "train.checkpoint_every=100", "train.val_episodes=20",
               "eval.episodes=20", "train.progress=false", "tune.num_samples=3",
               "tune.max_concurrent=1", "tune.scheduler=none", f"train.output_dir={tmp_path}",
               "--mlflow-uri", uri, "--no-follow"])
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    job_id = out.split("submitted ", 1)[1].split()[0]
    sweep_dir = tmp_path / "sweeps" / "tune_sinusoid_maml"
    wait_for(lambda: any(sweep_dir.glob("trials/*/checkpoints/step-0000100.pt")), 240,
             "the sweep's first trial to checkpoint")
    t0 = time.time()
    assert main(["jobs", "stop", job_id]) == 0
    assert f"{job_id}: STOPPED" in capsys.readouterr().out
    stopped_in = time.time() - t0
    logs = Jobs().logs(job_id)
    assert "trials ran their full length" in logs and "--resume" in logs, logs[-3000:]
    assert not (sweep_dir / "best_result.json").exists()  # not summarised
    parent_id = json.loads((sweep_dir / "sweep.json").read_text())["parent_run_id"]
    assert MlflowClient(uri).get_run(parent_id).info.status == "KILLED"
    trials = child_runs(uri, parent_id)
    assert trials and "RUNNING" not in {t.info.status for t in trials}
    with capsys.disabled():
        print(f"sweep stop -> STOPPED in {stopped_in:.0f} s")


def test_a_project_elsewhere_is_shipped_with_the_metadist_that_submits_it(
        cluster, tmp_path, monkeypatch, capsys):
    # The user stands in a project of their own: its config (and nothing of the metadist
    # checkout) is the job's working directory, and the metadist that submits it is
    # shipped beside it, so the job runs that code and its run records that commit.
    from mlflow import MlflowClient

    from metadist.tracking import git_commit

    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    (project / "configs" / "mine.yaml").write_text((ROOT / SINUSOID).read_text())
    monkeypatch.chdir(project)
    # The default store, ./mlflow.db of the project (mlflow.set_tracking_uri in an earlier
    # test of this process exports its URI).
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rc = main(["submit", "configs/mine.yaml", "train.steps=10", *TINY,
               "train.output_dir=runs"])
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    assert "meta-test mse:" in out and "SUCCEEDED" in err
    assert any((project / "runs").glob("*/checkpoints/*.pt"))  # paths made absolute
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("metadist").experiment_id])
    assert run.data.tags["git_commit"] == git_commit(ROOT / "metadist")
    # The job imported the shipped copy, not the one this machine's environment holds.
    from metadist.launch.jobs import runtime_env

    jobs = Jobs()
    job_id = jobs.submit('python -c "import metadist; print(metadist.__file__)"',
                         runtime_env(env_vars={}, root=project))
    wait_for(lambda: jobs.status(job_id).is_terminal(), 60, "the job to end")
    imported = Path(jobs.logs(job_id).strip().splitlines()[-1])
    assert imported.name == "__init__.py" and not imported.is_relative_to(ROOT), imported


def test_a_request_without_the_clusters_token_is_refused(cluster, tmp_path, capsys):
    jobs_before = len(Jobs().list())
    wrong = tmp_path / "wrong-token"
    wrong.write_text("0" * 64)
    rc = main(["submit", SINUSOID, "tracking.enabled=false", "--no-follow",
               "--token-file", str(wrong)])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"refused the request (invalid token; token taken from {wrong})" in err
    assert "~/.ray/auth_token" in err
    assert main(["jobs", "list", "--token-file", str(wrong)]) == 2
    assert "refused" in capsys.readouterr().err
    # A user with no token at all, in a fresh process: Ray caches a token it has seen once
    # in a process (an earlier ray.init in this one), which would send it anyway.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token
    proc = subprocess.run(
        [sys.executable, "-m", "metadist.cli", "submit", SINUSOID, "tracking.enabled=false",
         "--no-follow", "--address", cluster.dashboard_url],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "refused the request (no token; token taken from nowhere" in proc.stderr
    # Ray's own client without a token is refused too: the server enforces it.
    check = ("from ray.exceptions import AuthenticationError\n"
             "from ray.job_submission import JobSubmissionClient\n"
             "try:\n"
             f"    JobSubmissionClient({cluster.dashboard_url!r})\n"
             "except AuthenticationError:\n"
             "    raise SystemExit(3)\n")
    proc = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert len(Jobs().list()) == jobs_before  # nothing was submitted


def test_a_bad_config_is_refused_before_submitting(cluster, capsys):
    jobs_before = len(Jobs().list())
    assert main(["submit", SINUSOID, "algorithm.name=mamal"]) == 2
    assert "algorithm.name='mamal' is not one of" in capsys.readouterr().err
    assert len(Jobs().list()) == jobs_before
    # Nor a tracking URI with a password, which the job's environment would keep and show.
    assert main(["submit", SINUSOID, "--mlflow-uri", "http://alice:s3cr3t@127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "--mlflow-uri http://127.0.0.1:1...: the URI carries credentials" in err
    assert "s3cr3t" not in err and len(Jobs().list()) == jobs_before


def test_runs_that_cannot_work_fail_fast_with_a_clear_message(cluster, tmp_path):
    jobs = Jobs()
    base = ["python", "-m", "metadist.cli", "train", SINUSOID, "tracking.enabled=false",
            f"train.output_dir={tmp_path}"]
    cases = {  # what the job is given -> what its status message must say
        # a config that only the cluster sees as bad (bypassing the local check)
        "algorithm.name=mamal": "algorithm.name='mamal' is not one of",
        "data.dataset=/nonexistent/omniglot": "data.dataset=/nonexistent/omniglot: no such "
                                              "dataset directory",
        "workers=64": "workers=64 need 64 x {CPU 1}, but the nodes hold at most 2",
        "ray.use_gpu=true": "a worker needs {CPU 1, GPU 1}",
    }
    from metadist.launch.jobs import runtime_env

    t0 = time.time()
    submitted = {jobs.submit(" ".join([*base, "workers=2", override]),
                             runtime_env(env_vars={})): expected
                 for override, expected in cases.items()}
    wait_for(lambda: all(jobs.status(j).is_terminal() for j in submitted), 120,
             "the four jobs to end")
    took = time.time() - t0
    for job_id, expected in submitted.items():
        info = jobs.info(job_id)
        assert info.status == "FAILED"
        assert "exit code 2" in info.message and expected in info.message, info.message
        assert f"metadist: error: {expected}" in jobs.logs(job_id)
    print(f"four failing jobs ended in {took:.0f} s")
    assert took < 90  # not a hang: no worker was ever started


# --- helpers -------------------------------------------------------------------------


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def _http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False

