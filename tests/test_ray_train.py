"""Ray Train: N workers with the actor episode pipeline give the 1-worker result; a worker
killed mid-run is restarted from the last checkpoint and the run completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import listening_while_running, run_workers, sigterm_after_first_step

from metadist.config import load_config
from metadist.training.checkpoint import load_checkpoint
from metadist.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
       "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "OMP_NUM_THREADS": "1"}


def metadist(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "metadist.cli", *args], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result_of(proc: subprocess.Popen, timeout: float = 600) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out[out.index("{"):])


# Reptile's carried inner Adam over two workers is also held to one process by torchrun in
# tests/test_distributed.py; its Ray Train twin (about a minute) runs with -m slow.
@pytest.mark.parametrize("algorithm", ["maml", pytest.param("reptile-nichol",
                                                            marks=pytest.mark.slow)])
def test_two_ray_workers_with_actor_pipeline_match_one_process(tmp_path, omniglot_small,
                                                               algorithm):
    # Outer SGD: see tests/test_distributed.py on Adam and round-off.
    overrides = [f"data.dataset={omniglot_small}", "algorithm.meta_batch_size=5",
                 "algorithm.outer_optimizer=sgd", "algorithm.outer_lr=0.1",
                 "train.steps=3", "data.queries=3", "eval.episodes=8", "eval.batch_size=4",
                 "train.val_every=0", "train.progress=false", "train.inner_loop=loop",
                 "train.threads=1", f"train.output_dir={tmp_path / 'runs'}"]
    if algorithm == "reptile-nichol":
        # The actors must sample train_shots; each task's minibatches must not depend on
        # which worker runs it.
        overrides += ["algorithm.name=reptile", "data.train_shots=3", "data.train_queries=2",
                      "algorithm.inner_batch=4", "algorithm.inner_optimizer=adam",
                      "algorithm.inner_lr=0.001", "algorithm.outer_lr_final=0.0",
                      "algorithm.test_inner_batch=2"]
    config = ROOT / "configs" / "omniglot_5w1s_maml.yaml"
    # The actors decode into a shared directory (relative: the driver's working directory).
    proc = metadist("train", str(config), *overrides, "workers=2", "ray.actors=1",
                    "data.decode_cache=decoded",
                    f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path)
    distributed = result_of(proc)
    assert list((tmp_path / "decoded").glob("train-28px-1ch-*/*.npy"))
    single = train(load_config(config, overrides + ["tracking.enabled=false"]),
                   run_dir=tmp_path / "single")
    assert distributed["workers"] == 2 and distributed["pipeline"]["batches"] == 3
    one = load_checkpoint(single["checkpoint"])["params"]
    two = load_checkpoint(distributed["checkpoint"])["params"]
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
    assert distributed["mean"] == pytest.approx(single["mean"], abs=1e-6)


@pytest.mark.slow  # about two minutes: 600 steps on Ray Train with a worker killed mid-run
def test_a_killed_worker_is_restarted_and_the_run_completes(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    steps, every = 600, 100  # the kill lands near step 200, well before the end
    overrides = [f"train.steps={steps}", f"train.checkpoint_every={every}", "train.val_every=0",
                 "train.log_every=50", "eval.episodes=50", "train.progress=false",
                 "train.inner_loop=loop", "algorithm.outer_optimizer=sgd",
                 "algorithm.outer_lr=0.01", "train.threads=1"]
    config = ROOT / "configs" / "sinusoid_maml.yaml"
    proc = metadist(
        "train", str(config), "workers=2", "ray.max_failures=1", *overrides,
        f"train.output_dir={tmp_path / 'runs'}", f"tracking.tracking_uri={uri}", cwd=tmp_path,
    )
    runs = tmp_path / "runs"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        pids = list(runs.glob("*/workers/rank-1.pid"))
        # Rank 0 writes its file before Ray registers the report; once the next one is
        # written and Ray's storage holds a checkpoint, a restart must resume from it.
        if (pids and list(runs.glob(f"*/checkpoints/step-{2 * every:07d}.pt"))
                and list(runs.glob("ray/*/checkpoint_*/checkpoint.pt"))):
            os.kill(int(pids[0].read_text()), signal.SIGKILL)
            break
        time.sleep(0.2)
    else:
        pytest.fail("the run ended or never checkpointed before the worker could be killed")
    result = result_of(proc)
    assert result["resumed_from_step"] >= every  # this attempt started from a checkpoint
    history = load_checkpoint(result["checkpoint"])["history"]
    assert [h["step"] for h in history] == list(range(1, steps + 1))  # each step once
    run = mlflow.MlflowClient(tracking_uri=uri).get_run(result["mlflow_run_id"])
    assert run.data.tags["restarts"] == "1"
    assert run.data.metrics["test_mse"] == pytest.approx(result["mean"])
    # The restarted run followed the trajectory of the same 2-rank run left alone, exactly:
    # here the plain torchrun one (no Ray, and a fraction of Ray's start-up time).
    clean = run_workers(2, [str(config), *overrides, "tracking.enabled=false",
                            f"train.output_dir={tmp_path / 'clean'}"], tmp_path / "clean")
    restarted = load_checkpoint(result["checkpoint"])["params"]
    for k, v in load_checkpoint(clean["checkpoint"])["params"].items():
        torch.testing.assert_close(restarted[k], v, rtol=0, atol=0)
    assert clean["mean"] == result["mean"]


def test_a_sigterm_to_the_ray_train_driver_stops_the_workers_after_a_step_checkpointed(
        tmp_path):
    # `ray job stop` or a preempted head node signals the driver, waiting in Ray Train's
    # fit; the workers get nothing. The driver passes the request on: both workers end
    # after the same step, rank 0 checkpoints it (no periodic checkpoints here), Ray's
    # storage gets it, the MLflow run ends KILLED with the stop tagged, and the driver
    # exits as a terminated process does, instead of Ray's status 1 with the steps lost.
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    client.search_experiments()  # the store's tables exist before the run polls them
    proc = metadist(
        "train", str(ROOT / "configs" / "sinusoid_maml.yaml"), "workers=2",
        "train.steps=1000000", "train.log_every=1", "train.val_every=0",
        "train.checkpoint_every=0", "train.progress=false", "train.threads=1",
        f"train.output_dir={tmp_path / 'runs'}", f"tracking.tracking_uri={uri}", cwd=tmp_path)
    run_id, err = sigterm_after_first_step(client, proc, timeout=300, exit_timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    step = int(run.data.tags["stopped_after_step"])
    resume = Path(run.data.tags["resume_checkpoint"])
    assert resume.name == f"step-{step:07d}.pt" and load_checkpoint(resume)["step"] == step
    assert f"the workers stopped after step {step} of 1000000; continue with resume={resume}" \
        in err, err[-3000:]
    assert err.count("stopped after step") == 1, err[-3000:]  # the driver says it, once
    stored = list((tmp_path / "runs" / "ray").glob("*/checkpoint_*/checkpoint.pt"))
    assert [load_checkpoint(p)["step"] for p in stored] == [step]
    # Stopped, not failed: Ray Train did not start the workers again.
    assert "restarts" not in run.data.tags


def test_a_diverging_run_on_ray_workers_fails_with_the_single_process_message(tmp_path):
    proc = metadist("train", str(ROOT / "configs" / "sinusoid_maml.yaml"), "workers=2",
                    "algorithm.inner_lr=1e30", "train.steps=3", "train.val_every=0",
                    "train.inner_loop=loop", "tracking.enabled=false",
                    f"train.output_dir={tmp_path / 'runs'}", cwd=tmp_path)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2, err[-4000:]
    assert "metadist: error: the meta-training loss at step 1 is nan" in err, err[-4000:]
    # No checkpoint was written: neither the run's directory nor Ray's record of it is left.
    assert list((tmp_path / "runs").glob("*")) in ([], [tmp_path / "runs" / "ray"])
    assert not list((tmp_path / "runs").glob("ray/*"))


@pytest.fixture(scope="module")
def two_worker_listeners(tmp_path_factory) -> list[tuple[str, str]]:
    tmp_path = tmp_path_factory.mktemp("listen")
    runs = tmp_path / "runs"
    return listening_while_running(
        ["train", str(ROOT / "configs" / "sinusoid_maml.yaml"), "workers=2",
         "train.steps=100000", "train.val_every=0", "train.inner_loop=loop",
         "tracking.enabled=false", f"train.output_dir={runs}"],
        cwd=tmp_path, env=ENV, ready=lambda: any(runs.glob("*/workers/rank-1.pid")))


def test_everything_a_run_starts_listens_on_loopback_only(two_worker_listeners):
    # `train workers=2` without a cluster starts its own Ray: its GCS, raylet, workers,
    # agents and driver must not listen on the machine's other addresses, and neither may
    # the workers' process group (torch's rendezvous store, which torch binds to every
    # interface unless handed a socket, and gloo's pairs).
    found = two_worker_listeners
    names = {name for _, name in found}
    assert "ray::RayTrainWo" in names and len(names) > 1, found
    assert {host for host, _ in found} == {"127.0.0.1"}, found
