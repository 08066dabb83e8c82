"""`metadist tune`: Ray Tune sweeps over α, β, K with ASHA, tracked in MLflow as one parent
run with a nested run per trial; the best config is written, re-runs, is meta-tested and
registered; a killed sweep resumes without redoing (or re-logging) finished trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import child_runs, listening_while_running

from metadist.config import ConfigError, load_config
from metadist.launch.sweep import search_space, trial_config

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
       "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "OMP_NUM_THREADS": "1",
       "RAY_DEDUP_LOGS": "0"}


def metadist(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "metadist.cli", *args], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-5000:]
    return out


# -- the search space --------------------------------------------------------------------


def sweep_config(*overrides: str, space: dict | None = None, tmp_path: Path | None = None):
    path = ROOT / "configs" / "tune_sinusoid_maml.yaml"
    if space is not None:  # dotted keys cannot be written as command-line overrides
        data = yaml.safe_load(path.read_text())
        data["tune"]["space"].update(space)
        path = tmp_path / "sweep.yaml"
        path.write_text(yaml.safe_dump(data))
    return load_config(path, list(overrides))


def test_search_space_types_and_inclusive_int_range():
    from ray import tune

    space = search_space(sweep_config())
    assert isinstance(space["algorithm.inner_lr"], tune.search.sample.Float)
    k = space["algorithm.inner_steps"]
    assert {k.sample() for _ in range(300)} == {1, 2, 3, 4, 5}  # high is inclusive


@pytest.mark.parametrize("space, message", [
    ({"train.nonsense": {"type": "int", "low": 1, "high": 2}}, "'train.nonsense' is not a config"),
    ({"algorithm.inner_lr": {"type": "loguniform", "low": 0, "high": 1}}, "0 < low < high"),
    ({"algorithm.inner_steps": {"type": "int", "low": 3, "high": 1}}, "low <= high"),
    ({"algorithm.name": {"type": "choice", "values": []}}, "non-empty"),
    ({"algorithm.outer_lr": {"type": "gaussian", "low": 0, "high": 1}}, "'gaussian'"),
])
def test_bad_search_spaces_name_the_key(space, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        search_space(sweep_config(space=space, tmp_path=tmp_path))


@pytest.mark.parametrize("override, message", [
    ("train.checkpoint_every=250", "multiple of train.val_every"),
    ("train.val_every=0", "val_every must be >= 1"),
])
def test_trials_must_validate_at_their_checkpoints(override, message):
    with pytest.raises(ConfigError, match=message):
        search_space(sweep_config(override))


def test_bad_tune_settings_are_config_errors():
    with pytest.raises(ConfigError, match="tune.search='grid'"):
        sweep_config("tune.search=grid")
    with pytest.raises(ConfigError, match="tune.reduction_factor"):
        sweep_config("tune.reduction_factor=1")
    with pytest.raises(ConfigError, match=r"tune.max_concurrent=-1 must be >= 0"):
        sweep_config("tune.max_concurrent=-1")
    from metadist.launch.sweep import run_sweep

    with pytest.raises(ConfigError, match=r"tracking.register_model='m' is for `metadist "
                       r"train`: a sweep registers its best model as tune.model_name"):
        run_sweep(sweep_config("tracking.register_model=m"))


def test_trial_config_applies_sampled_values_and_checks_them():
    from metadist.config import to_dict

    base = to_dict(sweep_config())
    cfg = trial_config(base, {"algorithm.inner_lr": 0.05, "algorithm.inner_steps": 3,
                              "algorithm.name": "fomaml"})
    assert (cfg.algorithm.inner_lr, cfg.algorithm.inner_steps, cfg.algorithm.name) == (
        0.05, 3, "fomaml")
    with pytest.raises(ConfigError, match="algorithm.name"):
        trial_config(base, {"algorithm.name": "sgd"})


def test_an_existing_sweep_is_never_overwritten(tmp_path):
    from metadist.launch.sweep import run_sweep

    sweep_dir = tmp_path / "sweeps" / "tune_sinusoid_maml"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "keep.txt").write_text("old")
    cfg = sweep_config(f"train.output_dir={tmp_path}", "tracking.enabled=false")
    with pytest.raises(FileExistsError, match="--resume"):
        run_sweep(cfg)
    assert (sweep_dir / "keep.txt").read_text() == "old"
    with pytest.raises(FileNotFoundError, match="no sweep to resume"):
        run_sweep(sweep_config(f"train.output_dir={tmp_path}", "tune.name=other",
                               f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}"),
                  resume=True)
    assert not (tmp_path / "m.db").exists()  # nothing touched before the check


def test_unreachable_tracking_server_fails_before_any_trial(tmp_path):
    proc = metadist("tune", str(ROOT / "configs" / "tune_sinusoid_maml.yaml"),
                    "tracking.tracking_uri=http://127.0.0.1:9", f"train.output_dir={tmp_path}",
                    cwd=tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "http://127.0.0.1:9 is unreachable" in err
    assert not (tmp_path / "sweeps").exists()  # nothing started, nothing written


# -- a real sweep on Omniglot ------------------------------------------------------------


def test_omniglot_sweep_nested_runs_asha_best_config_and_registered_model(
        tmp_path, omniglot_small):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    steps = 24
    proc = metadist(
        "tune", str(ROOT / "configs" / "tune_omniglot_5w1s_maml.yaml"),
        f"data.dataset={omniglot_small}", f"train.steps={steps}", "train.val_every=4",
        "train.checkpoint_every=12", "train.val_episodes=10", "train.log_every=4",
        "model.hidden=8", "data.queries=2", "algorithm.meta_batch_size=2",
        "eval.episodes=20", "eval.batch_size=10", "tune.num_samples=8", "tune.grace_period=4",
        "tune.reduction_factor=2", "tune.max_concurrent=2", "tune.cpus_per_trial=1",
        "tune.search=tpe", "tune.model_name=omniglot-best", f"train.output_dir={tmp_path}",
        f"tracking.tracking_uri={uri}", cwd=tmp_path,
    )
    out = finish(proc)
    sweep_dir = tmp_path / "sweeps" / "tune_omniglot_5w1s_maml"
    summary = json.loads((sweep_dir / "best_result.json").read_text())
    client = MlflowClient(uri)

    # One parent run with one nested run per trial, each with params, metrics, artifacts.
    parent_id = json.loads((sweep_dir / "sweep.json").read_text())["parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep"] == "true"
    assert parent.data.params["tune.space.algorithm.inner_lr"] == "loguniform(0.05, 1)"
    assert parent.data.params["tune.space.algorithm.inner_steps"] == "int(1, 3)"
    assert parent.data.params["tune.search"] == "tpe"
    children = child_runs(uri, parent_id)
    assert len(children) == 8
    assert len({c.data.tags["metadist.trial_id"] for c in children}) == 8
    for child in children:
        assert child.data.params["data.dataset"] == str(omniglot_small)
        assert child.data.tags["algorithm"] == "maml" and child.data.tags["shots"] == "1"
        assert "val_accuracy" in child.data.metrics and "train_loss" in child.data.metrics
        assert "test_accuracy" not in child.data.metrics  # trials never see the test classes
        sampled = json.loads(child.data.tags["trial_params"])
        assert float(child.data.params["algorithm.inner_lr"]) == sampled["algorithm.inner_lr"]

    # ASHA stopped some trials early; they are marked so in MLflow.
    stopped = [c for c in children if "stopped_early_at_step" in c.data.tags]
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert stopped, "ASHA stopped no trial"
    assert all(int(c.data.tags["stopped_early_at_step"]) < steps for c in stopped)
    assert all(c.info.status == "KILLED" for c in stopped)
    assert finished and len(finished) + len(stopped) == 8
    history = client.get_metric_history(stopped[0].info.run_id, "val_accuracy")
    assert max(m.step for m in history) < steps
    for child in finished:
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"config.yaml", "curves.png", "result.json", "checkpoints"} <= artifacts
    assert summary["trials"] and sum(t["stopped_early"] for t in summary["trials"]) == len(stopped)

    # The best trial is the best completed one on validation accuracy.
    best_child = next(c for c in children
                      if c.data.tags["metadist.trial_id"] == summary["best_trial"])
    assert best_child.info.status == "FINISHED"
    assert summary["best_val_accuracy"] == pytest.approx(
        max(c.data.metrics["val_accuracy"] for c in finished))

    # Its meta-test on the held-out test split, logged on the parent.
    test = summary["test"]
    assert test["split"] == "test" and test["episodes"] == 20
    assert parent.data.metrics["test_accuracy"] == pytest.approx(test["mean"])
    assert "meta-test accuracy of the best config" in out
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"best_config.yaml", "best_result.json", "trials.csv", "sweep.png"} <= artifacts

    # The best config is a ready-to-run file with the best values; it re-runs.
    best_file = sweep_dir / "best_config.yaml"
    written = yaml.safe_load(best_file.read_text())
    for key, value in summary["best_params"].items():
        section, name = key.split(".")
        assert written[section][name] == value
    rerun = metadist("train", str(best_file), "train.steps=2", "tracking.enabled=false",
                     f"train.output_dir={tmp_path / 'rerun'}", cwd=tmp_path)
    result = json.loads((lambda o: o[o.index("{"):])(finish(rerun)))
    assert result["split"] == "test" and result["steps"] == 2

    # The best model is registered as a pyfunc model that answers a task as the Learner
    # API does (its own input example: 5 synthetic classes for the 5-way head).
    import base64

    import mlflow.pyfunc
    import numpy as np

    from metadist.learner import Learner

    version = client.get_model_version("omniglot-best", "1")
    assert version.run_id == parent_id
    assert summary["registered_model"]["model_uri"] == "models:/omniglot-best/1"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        loaded = mlflow.pyfunc.load_model("models:/omniglot-best/1")
    finally:
        mlflow.set_tracking_uri(previous)
    task = loaded.input_example.iloc[0].to_dict()
    [answer] = loaded.predict(task)
    decoded = {f: [base64.b64decode(v) for v in task[f]] for f in ("support", "query")}
    reference = Learner.load(summary["best_checkpoint"]).adapt(decoded["support"],
                                                               list(task["labels"]))
    assert answer["labels"] == reference.predict(decoded["query"])
    np.testing.assert_allclose(answer["probabilities"],
                               reference.predict_proba(decoded["query"]).numpy(), atol=1e-6)


@pytest.mark.slow  # about 2 minutes: the MAML sweep above covers the machinery by default
def test_a_protonet_sweep_registers_a_model_of_any_number_of_classes(tmp_path,
                                                                     omniglot_small):
    import mlflow
    import mlflow.pyfunc
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = metadist(
        "tune", str(ROOT / "configs" / "tune_omniglot_5w1s_protonet.yaml"),
        f"data.dataset={omniglot_small}", "train.steps=8", "train.val_every=4",
        "train.checkpoint_every=4", "train.val_episodes=10", "train.log_every=4",
        "model.hidden=8", "eval.episodes=20", "eval.batch_size=10", "tune.num_samples=3",
        "tune.grace_period=4", "tune.max_concurrent=2", "tune.cpus_per_trial=1",
        f"train.output_dir={tmp_path}", f"tracking.tracking_uri={uri}", cwd=tmp_path,
    )
    finish(proc)
    summary = json.loads((tmp_path / "sweeps" / "tune_omniglot_5w1s_protonet"
                          / "best_result.json").read_text())
    assert summary["test"]["episodes"] == 20 and summary["test"]["head"] == "prototypes"
    assert set(summary["best_params"]) == {"algorithm.outer_lr", "data.train_ways",
                                           "data.train_queries"}
    version = MlflowClient(uri).get_model_version("omniglot-protonet", "1")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        loaded = mlflow.pyfunc.load_model(f"models:/omniglot-protonet/{version.version}")
    finally:
        mlflow.set_tracking_uri(previous)
    task = loaded.input_example.iloc[0].to_dict()  # 3 classes: any number will do
    for ways in (2, 3):
        [answer] = loaded.predict({"support": list(task["support"])[:ways],
                                   "labels": list(task["labels"])[:ways],
                                   "query": list(task["query"])})
        assert len(answer["classes"]) == ways and len(answer["probabilities"][0]) == ways


# -- kill and resume ---------------------------------------------------------------------


def resumable_sweep(tmp_path: Path, steps: int, trials: int) -> tuple[list[str], str]:
    """A sinusoid sweep of trials one after another, checkpointed every 100 steps."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return ["tune", str(ROOT / "configs" / "tune_sinusoid_maml.yaml"), f"train.steps={steps}",
            "train.val_every=50", "train.checkpoint_every=100", "train.val_episodes=20",
            "eval.episodes=20", f"tune.num_samples={trials}", "tune.max_concurrent=1",
            "tune.scheduler=none", f"train.output_dir={tmp_path}",
            f"tracking.tracking_uri={uri}"], uri


@pytest.mark.slow  # over a minute; the SIGTERM test below resumes a sweep in the default run
def test_a_killed_sweep_resumes_without_redoing_finished_trials(tmp_path):
    args, uri = resumable_sweep(tmp_path, steps=300, trials=4)
    trials = tmp_path / "sweeps" / "tune_sinusoid_maml" / "trials"
    proc = metadist(*args, cwd=tmp_path)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        finals = list(trials.glob("*/checkpoints/final.pt"))
        started = list(trials.glob("*/checkpoints/step-0000100.pt"))
        # Two trials done and the third one checkpointed: kill the sweep mid-trial.
        if len(finals) >= 2 and len(started) >= 3:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    else:
        pytest.fail("the sweep ended before it could be killed:\n" + proc.stderr.read()[-3000:])
    proc.wait()
    parent_id = json.loads((trials.parent / "sweep.json").read_text())["parent_run_id"]
    before = {c.data.tags["metadist.trial_id"]: c for c in child_runs(uri, parent_id)}
    done_before = {t for t, c in before.items() if c.info.status == "FINISHED"}
    assert 2 <= len(done_before) < 4
    mtimes = {t: (trials / t / "checkpoints" / "final.pt").stat().st_mtime for t in done_before}
    finish(metadist(*args, "--resume", cwd=tmp_path))

    after = child_runs(uri, parent_id)
    ids = [c.data.tags["metadist.trial_id"] for c in after]
    assert len(ids) == 4 and len(set(ids)) == 4  # no duplicate runs
    assert all(c.info.status == "FINISHED" for c in after)
    for c in after:  # every trial's run is the one it had before the kill
        if c.data.tags["metadist.trial_id"] in before:
            assert c.info.run_id == before[c.data.tags["metadist.trial_id"]].info.run_id
    for t in done_before:  # finished trials were not run again
        assert (trials / t / "checkpoints" / "final.pt").stat().st_mtime == mtimes[t]
    summary = json.loads((trials.parent / "best_result.json").read_text())
    assert len(summary["trials"]) == 4 and all(t["steps_done"] == 300 for t in summary["trials"])


@pytest.mark.parametrize("signum", [signal.SIGTERM,
                                    pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_signalled_sweep_stops_unsummarised_and_resumes(signum, tmp_path):
    # `metadist jobs stop` and a preempting scheduler send SIGTERM to the driver alone;
    # Ctrl-C sends SIGINT. Either must leave a resumable sweep, not a finished-looking one.
    args, uri = resumable_sweep(tmp_path, steps=200, trials=3)
    sweep_dir = tmp_path / "sweeps" / "tune_sinusoid_maml"
    proc = metadist(*args, cwd=tmp_path)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        finals = list(sweep_dir.glob("trials/*/checkpoints/final.pt"))
        started = list(sweep_dir.glob("trials/*/checkpoints/step-0000100.pt"))
        if len(finals) >= 1 and len(started) >= 2:  # one trial done, the second under way
            os.kill(proc.pid, signum)
            break
        time.sleep(0.2)
    else:
        pytest.fail("the sweep ended before it could be signalled:\n"
                    + proc.stderr.read()[-3000:])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-5000:]
    assert "trials ran their full length" in err and "--resume" in err
    # Not summarised: no best config chosen among the trials that happened to be done.
    assert not (sweep_dir / "best_result.json").exists()
    assert not (sweep_dir / "best_config.yaml").exists()
    from mlflow import MlflowClient

    parent_id = json.loads((sweep_dir / "sweep.json").read_text())["parent_run_id"]
    assert MlflowClient(uri).get_run(parent_id).info.status == "KILLED"
    before = child_runs(uri, parent_id)
    assert {c.info.status for c in before} == {"FINISHED", "KILLED"}  # none left RUNNING

    finish(metadist(*args, "--resume", cwd=tmp_path))
    after = child_runs(uri, parent_id)
    assert len(after) == 3 and all(c.info.status == "FINISHED" for c in after)
    assert {c.info.run_id for c in before} <= {c.info.run_id for c in after}
    summary = json.loads((sweep_dir / "best_result.json").read_text())
    assert all(t["steps_done"] == 200 for t in summary["trials"])


def test_an_interrupted_trial_whose_process_could_not_end_its_run_is_ended_killed(
        tmp_path, capsys):
    # Tune's interrupt lets trials end their own runs; one force-killed in the middle of
    # a step cannot, and its run must not stay RUNNING.
    from types import SimpleNamespace

    from mlflow import MlflowClient

    from metadist.launch.sweep import TRIAL_TAG, stop_interrupted

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("sweep")
    parent = client.create_run(experiment).info.run_id
    done, cut = (client.create_run(experiment, tags={"mlflow.parentRunId": parent,
                                                     TRIAL_TAG: t}).info.run_id
                 for t in ("t0", "t1"))
    client.set_terminated(done, "FINISHED")
    config = sweep_config("train.steps=200", "tune.num_samples=3")
    grid = [SimpleNamespace(error=None, metrics={"step": 200}),
            SimpleNamespace(error=None, metrics={"step": 100})]
    with pytest.raises(SystemExit) as exit_:
        stop_interrupted(signal.SIGTERM, config, grid,
                         {"parent_run_id": parent, "tracking_uri": uri}, tmp_path)
    assert exit_.value.code == 143
    assert client.get_run(cut).info.status == "KILLED"
    assert client.get_run(done).info.status == "FINISHED"
    assert "stopped by SIGTERM, 1 of 3 trials ran their full length" in capsys.readouterr().err


def test_trials_with_workers_run_on_their_own_ray_train_workers(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    finish(metadist(
        "tune", str(ROOT / "configs" / "tune_sinusoid_maml.yaml"), "workers=2",
        "train.steps=100", "train.val_every=50", "train.checkpoint_every=50",
        "eval.episodes=20", "tune.num_samples=2", "tune.max_concurrent=1",
        "tune.scheduler=none", "tune.cpus_per_trial=0.5", "train.inner_loop=loop",
        f"train.output_dir={tmp_path}", f"tracking.tracking_uri={uri}", cwd=tmp_path,
    ))
    sweep_dir = tmp_path / "sweeps" / "tune_sinusoid_maml"
    results = list(sweep_dir.glob("trials/*/result.json"))
    assert len(results) == 2
    assert all(json.loads(r.read_text())["workers"] == 2 for r in results)
    parent_id = json.loads((sweep_dir / "sweep.json").read_text())["parent_run_id"]
    children = child_runs(uri, parent_id)
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert all(c.data.metrics["val_mse"] > 0 for c in children)  # reported from rank 0
    # tune.max_concurrent=1 with random search: one trial after the other.
    first, second = sorted(children, key=lambda c: c.info.start_time)
    assert first.info.end_time <= second.info.start_time
    assert json.loads((sweep_dir / "best_result.json").read_text())["test"]["episodes"] == 20


def test_the_ray_a_sweep_starts_listens_on_loopback_only(tmp_path):
    sweeps = tmp_path / "sweeps"
    addresses = listening_while_running(
        ["tune", str(ROOT / "configs" / "tune_sinusoid_maml.yaml"), "tune.num_samples=2",
         "train.steps=100000", "tracking.enabled=false", f"tune.storage_path={sweeps}"],
        cwd=tmp_path, env=ENV, ready=lambda: any(sweeps.glob("*/trials/*/config.yaml")))
    assert addresses and {host for host, _ in addresses} == {"127.0.0.1"}, addresses
