"""End-to-end training: the recipe, resume, the CLI, MLflow tracking, evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from metadist.cli import main
from metadist.config import load_config
from metadist.training.checkpoint import load_checkpoint
from metadist.training.loop import train
from metadist.training.signals import sigterm_unwinds

ROOT = Path(__file__).resolve().parents[1]
SINUSOID = ROOT / "configs" / "sinusoid_maml.yaml"


def sinusoid(tmp_path, *overrides):
    return load_config(SINUSOID, [
        f"train.output_dir={tmp_path / 'runs'}", "train.progress=false", "tracking.enabled=false",
        "train.val_every=0", "eval.episodes=200", *overrides,
    ])


def test_meta_training_beats_the_initialisation_on_held_out_sinusoids(tmp_path):
    untrained = train(sinusoid(tmp_path, "train.steps=0"))
    trained = train(sinusoid(tmp_path, "train.steps=1000"))
    assert trained["metric"] == "mse" and trained["episodes"] == 200
    # 10-step adaptation from the meta-learned init must beat it from a random init.
    assert trained["mean"] + trained["ci95"] < untrained["mean"] - untrained["ci95"]
    ckpt = load_checkpoint(trained["checkpoint"])
    assert ckpt["step"] == 1000 and set(ckpt["params"]) == {
        "fc0.weight", "fc0.bias", "fc1.weight", "fc1.bias", "head.weight", "head.bias"}


@pytest.mark.parametrize("algorithm", ["maml", "reptile", "reptile-nichol", "reptile-carried"])
def test_resume_continues_the_identical_trajectory(tmp_path, algorithm):
    extra = [f"algorithm.name={algorithm.split('-')[0]}", "train.checkpoint_every=20",
             "train.inner_loop=loop"]
    if algorithm.startswith("reptile"):
        extra += ["algorithm.outer_optimizer=sgd", "algorithm.outer_lr=0.5"]
    nichol = algorithm in ("reptile-nichol", "reptile-carried")
    if nichol:  # minibatches, inner Adam, annealed β: all resumable
        extra += ["data.train_shots=12", "algorithm.inner_batch=4", "algorithm.inner_steps=3",
                  "algorithm.inner_optimizer=adam", "algorithm.outer_lr_final=0.0"]
    if algorithm == "reptile-carried":  # and the inner Adam's state, carried on
        extra += ["algorithm.inner_state=carried"]
    full = train(sinusoid(tmp_path / "a", "train.steps=40", *extra))
    if nichol:  # β's schedule spans train.steps: stop the 40-step run
        half = Path(full["run_dir"]) / "checkpoints" / "step-0000020.pt"
    else:  # extend a 20-step run
        half = train(sinusoid(tmp_path / "b", "train.steps=20", *extra))["checkpoint"]
    resumed = train(sinusoid(tmp_path / "c", "train.steps=40", *extra), resume=half)
    a, b = load_checkpoint(full["checkpoint"]), load_checkpoint(resumed["checkpoint"])
    for k in a["params"]:
        torch.testing.assert_close(a["params"][k], b["params"][k], rtol=0, atol=0)
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    assert resumed["mean"] == full["mean"]


def test_a_sigterm_stops_after_the_step_in_flight_with_a_checkpoint_to_resume(
        tmp_path, monkeypatch, capsys):
    # A preempted job gets SIGTERM; the steps since the last periodic checkpoint must not be
    # lost. The signal arrives in the middle of step 7 (inside its meta-gradient).
    import os
    import signal

    import metadist.training.loop

    real, calls = metadist.training.loop.meta_gradient, []

    def meta_gradient(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    extra = ["algorithm.name=reptile", "algorithm.outer_optimizer=sgd",
             "algorithm.outer_lr=0.5", "data.train_shots=12", "algorithm.inner_batch=4",
             "algorithm.inner_optimizer=adam", "algorithm.inner_state=carried",
             "algorithm.outer_lr_final=0.0", "train.inner_loop=loop", "train.steps=12",
             "train.checkpoint_every=5"]
    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(metadist.training.loop, "meta_gradient", meta_gradient)
    with pytest.raises(SystemExit) as stopped, sigterm_unwinds():  # as `metadist train`
        train(sinusoid(tmp_path / "a", *extra))
    monkeypatch.undo()
    assert stopped.value.code == 128 + signal.SIGTERM and len(calls) == 7
    assert signal.getsignal(signal.SIGTERM) == before
    ckpt = next((tmp_path / "a" / "runs").glob("*/checkpoints/step-0000007.pt"))
    assert f"stopped after step 7 of 12; continue with resume={ckpt}" in capsys.readouterr().err
    assert load_checkpoint(ckpt)["step"] == 7 and len(load_checkpoint(ckpt)["history"]) == 7

    resumed = train(sinusoid(tmp_path / "b", *extra), resume=ckpt)
    full = train(sinusoid(tmp_path / "c", *extra))
    a, b = load_checkpoint(full["checkpoint"]), load_checkpoint(resumed["checkpoint"])
    for k in a["params"]:
        torch.testing.assert_close(a["params"][k], b["params"][k], rtol=0, atol=0)
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]


def test_a_second_sigterm_does_not_wait_for_the_step(tmp_path, monkeypatch):
    # For a grace period shorter than a step: the second signal unwinds at once.
    import os
    import signal

    import metadist.training.loop

    noted = []

    def meta_gradient(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        noted.append(1)  # the first only asks for a stop at the end of the step
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the second SIGTERM did not unwind")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(metadist.training.loop, "meta_gradient", meta_gradient)
    with pytest.raises(SystemExit) as stopped, sigterm_unwinds():
        train(sinusoid(tmp_path, "train.inner_loop=loop", "train.checkpoint_every=1"))
    assert stopped.value.code == 128 + signal.SIGTERM and noted == [1]
    assert signal.getsignal(signal.SIGTERM) == before
    assert not list(tmp_path.glob("runs/*/checkpoints/*.pt"))


def test_a_carried_inner_state_is_checkpointed_and_evaluated_from(tmp_path):
    from metadist.training.evaluate import evaluate_checkpoint

    extra = ["algorithm.name=reptile", "algorithm.outer_optimizer=sgd", "algorithm.outer_lr=0.5",
             "algorithm.inner_steps=3", "algorithm.inner_optimizer=adam",
             "algorithm.inner_lr=0.01", "train.steps=10", "train.inner_loop=loop"]
    carried = train(sinusoid(tmp_path / "a", *extra, "algorithm.inner_state=carried"))
    state = load_checkpoint(carried["checkpoint"])
    assert state["inner_moments"]["step"] == 10 * 3
    v = state["inner_moments"]["moments"]["fc0.weight"][1]
    assert v.shape == state["params"]["fc0.weight"].shape and v.min() >= 0 and v.max() > 0
    assert carried["inner_state"] == "carried"
    # The meta-test starts every episode from the carried state, in training and after.
    again = evaluate_checkpoint(carried["checkpoint"], episodes=200, device="cpu")
    assert again["mean"] == carried["mean"]
    # ...which is not where a fresh inner Adam would start.
    state["config"]["algorithm"]["inner_state"] = "task"
    torch.save(state, tmp_path / "as-task.pt")
    fresh = evaluate_checkpoint(str(tmp_path / "as-task.pt"), episodes=200, device="cpu")
    assert fresh["mean"] != carried["mean"]
    task = train(sinusoid(tmp_path / "b", *extra))
    assert load_checkpoint(task["checkpoint"])["inner_moments"] is None


def test_eval_tests_on_the_queries_asked_for(tmp_path, capsys):
    from metadist.training.evaluate import evaluate_checkpoint

    result = train(sinusoid(tmp_path, "train.steps=20", "eval.episodes=50",
                            "train.inner_loop=loop"))
    assert result["queries"] == 10
    same = evaluate_checkpoint(result["checkpoint"], device="cpu")
    assert same["mean"] == result["mean"] and same["queries"] == 10
    one = evaluate_checkpoint(result["checkpoint"], queries=1, device="cpu")
    assert one["queries"] == 1 and one["episodes"] == 50 and one["mean"] != result["mean"]
    assert main(["eval", result["checkpoint"], "--queries", "0"]) == 2
    assert "queries must be an integer >= 1" in capsys.readouterr().err


def test_a_diverging_run_fails_loudly_and_reports_no_result(tmp_path, capsys):
    argv = ["train", str(SINUSOID), "algorithm.inner_lr=1e30", "train.steps=5",
            "train.val_every=0", "tracking.enabled=false", "train.inner_loop=loop",
            f"train.output_dir={tmp_path / 'runs'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "the meta-training loss at step 1 is nan: the run diverged" in err
    assert "Traceback" not in err
    # Nothing worth keeping was written (no checkpoint), so no run directory is left.
    assert list((tmp_path / "runs").iterdir()) == []


def test_only_a_run_with_nothing_worth_keeping_is_discarded(tmp_path):
    from metadist.training.loop import discard_unused_run

    def run(*files: str) -> Path:
        root = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        for name in files:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text("x")
        return root

    for files in [("config.yaml",), ("config.yaml", "workers/rank-0.pid", "workers/rank-1.pid"),
                  (".validate_storage_marker",)]:
        root = run(*files)
        assert discard_unused_run(root) and not root.exists(), files
    for files in [("config.yaml", "checkpoints/step-0000002.pt"), ("config.yaml", "notes.txt"),
                  ("config.yaml", "workers/rank-0.pid/x"), ("result.json",),
                  ("checkpoint_000000/checkpoint.pt", ".validate_storage_marker")]:
        root = run(*files)
        assert not discard_unused_run(root) and all((root / f).exists() for f in files), files
    assert not discard_unused_run(tmp_path / "absent")


def test_eval_refuses_no_episodes_and_a_non_finite_score(tmp_path, capsys):
    result = train(sinusoid(tmp_path, "train.steps=2", "eval.episodes=5",
                            "train.inner_loop=loop"))
    for episodes in ("0", "-5"):
        assert main(["eval", result["checkpoint"], "--episodes", episodes]) == 2
        assert f"episodes must be an integer >= 1, got {episodes}" in capsys.readouterr().err
    state = load_checkpoint(result["checkpoint"])
    state["params"] = {k: torch.full_like(v, float("nan")) for k, v in state["params"].items()}
    poisoned = tmp_path / "nan.pt"
    torch.save(state, poisoned)
    assert main(["eval", str(poisoned), "--episodes", "5"]) == 2
    err = capsys.readouterr().err
    assert "the mse over 5 episodes is nan" in err and "Traceback" not in err


def test_extending_an_annealed_run_re_anneals_beta_over_the_new_length(tmp_path):
    extra = ["algorithm.name=reptile", "algorithm.outer_optimizer=sgd", "algorithm.outer_lr=1.0",
             "algorithm.outer_lr_final=0.0", "train.inner_loop=loop", "train.checkpoint_every=1"]
    four = train(sinusoid(tmp_path / "a", "train.steps=4", *extra))["checkpoint"]
    theta = load_checkpoint(four)["params"]
    deltas = {}
    for steps in (8, 12):
        run = train(sinusoid(tmp_path / f"to{steps}", f"train.steps={steps}", *extra), resume=four)
        fifth = load_checkpoint(Path(run["run_dir"]) / "checkpoints" / "step-0000005.pt")
        deltas[steps] = torch.cat([(fifth["params"][k] - theta[k]).flatten() for k in theta])
        history = json.loads((Path(run["run_dir"]) / "history.json").read_text())
        expected = [1 - s / 4 for s in (1, 2, 3, 4)] + [1 - s / steps for s in range(5, steps + 1)]
        assert [h["outer_lr"] for h in history] == pytest.approx(expected)
    # Step 5 applies β = 1 - 4/steps, whatever rate the 4-step run ended on (0): the same
    # Reptile direction, scaled by 0.5 when extended to 8 steps and by 2/3 to 12.
    assert deltas[8].abs().max() > 0
    torch.testing.assert_close(deltas[12], deltas[8] * (2 / 3) / 0.5, rtol=1e-4, atol=1e-6)


def test_omniglot_run_on_real_data_reports_the_protocol(tmp_path, omniglot_small):
    cfg = load_config(ROOT / "configs" / "omniglot_5w1s_maml.yaml", [
        f"data.dataset={omniglot_small}", f"train.output_dir={tmp_path}", "train.steps=3",
        "algorithm.meta_batch_size=4", "train.val_every=3", "train.val_episodes=10",
        "eval.episodes=30", "eval.batch_size=16", "train.progress=false",
        "tracking.enabled=false", "train.inner_loop=vmap",
    ])
    result = train(cfg)
    assert result["metric"] == "accuracy" and 0.0 <= result["mean"] <= 1.0
    assert result["episodes"] == 30 and result["split"] == "test"
    assert (result["ways"], result["shots"], result["queries"]) == (5, 1, 15)
    assert result["inner_steps"] == 3 and result["inner_loop"] == "vmap"
    saved = json.loads((Path(result["run_dir"]) / "result.json").read_text())
    assert saved["mean"] == result["mean"]
    # Evaluating the saved checkpoint reproduces the same episodes and the same number.
    assert main(["eval", result["checkpoint"], "--episodes", "30"]) == 0


def test_conv_meta_training_on_real_data_repeats_and_resumes_bit_for_bit(tmp_path, omniglot_small):
    # The README's claim that re-runs on one machine are identical (so a re-run that moves
    # points at the machine, not at us) rests on this: Conv4 with batch norm, real episodes.
    def config(name):
        return load_config(ROOT / "configs" / "omniglot_5w1s_maml.yaml", [
            f"data.dataset={omniglot_small}", f"train.output_dir={tmp_path / name}",
            "train.steps=4", "train.checkpoint_every=2", "algorithm.meta_batch_size=4",
            "train.val_every=0", "eval.episodes=10", "train.progress=false",
            "tracking.enabled=false", "train.inner_loop=loop",
        ])

    first, again = train(config("a")), train(config("b"))
    half = Path(first["run_dir"]) / "checkpoints" / "step-0000002.pt"
    resumed = train(config("c"), resume=half)
    a = load_checkpoint(first["checkpoint"])
    assert a["step"] == 4
    for other in (again, resumed):
        b = load_checkpoint(other["checkpoint"])
        for k in a["params"]:
            torch.testing.assert_close(a["params"][k], b["params"][k], rtol=0, atol=0)
        assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
        assert other["mean"] == first["mean"]


def test_reptile_with_nichol_et_al_s_options_on_real_data(tmp_path, omniglot_small):
    from metadist.training.streams import open_streams

    cfg = load_config(ROOT / "configs" / "omniglot_5w1s_reptile.yaml", [
        f"data.dataset={omniglot_small}", f"train.output_dir={tmp_path}", "train.steps=4",
        "data.train_shots=6", "data.train_queries=2", "algorithm.inner_batch=10",
        "algorithm.test_inner_batch=3", "algorithm.inner_optimizer=adam",
        "algorithm.inner_lr=0.001", "algorithm.outer_lr_final=0", "algorithm.meta_batch_size=2",
        "train.val_every=0", "eval.episodes=8", "train.progress=false",
        "tracking.enabled=false", "train.inner_loop=loop",
    ])
    streams = open_streams(cfg.data, train_seed=0, eval_seed=1)
    assert streams.train.episode(0).support_x.shape[0] == 5 * 6  # train_shots
    assert streams.train.episode(0).query_x.shape[0] == 5 * 2  # train_queries
    assert streams.test.episode(0).support_x.shape[0] == 5 * 1  # data.shots
    result = train(cfg)
    history = json.loads((Path(result["run_dir"]) / "history.json").read_text())
    # β annealed linearly from 1 to 0 over the 4 steps (the rate after each step).
    assert [h["outer_lr"] for h in history] == pytest.approx([0.75, 0.5, 0.25, 0.0])
    assert (result["shots"], result["inner_batch"], result["inner_optimizer"]) == (1, 3, "adam")
    # The meta-test's minibatches follow the episodes: evaluating again gives the same number.
    assert main(["eval", result["checkpoint"], "--episodes", "8"]) == 0


def test_cli_train_records_the_run_in_mlflow(tmp_path, monkeypatch, capsys):
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(["train", str(SINUSOID), "train.steps=30", "train.val_every=15",
                 "train.log_every=5", "eval.episodes=50", "train.progress=false",
                 f"tracking.tracking_uri={uri}", "tracking.experiment=test-exp"])
    assert code == 0
    out = capsys.readouterr().out
    assert "meta-test mse" in out
    result = json.loads(out[out.index("{"):])
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["algorithm.inner_lr"] == "0.01"
    assert run.data.tags["algorithm"] == "maml"
    assert run.data.metrics["test_mse"] == pytest.approx(result["mean"])
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [5, 10, 15, 20, 25, 30]
    assert len(client.get_metric_history(run.info.run_id, "val_mse")) == 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "result.json", "curves.png", "checkpoints"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == [
        "checkpoints/final.pt"]


def test_unreachable_tracking_store_fails_before_training(tmp_path, capsys):
    code = main(["train", str(SINUSOID), f"train.output_dir={tmp_path}",
                 "tracking.tracking_uri=http://127.0.0.1:9/", "train.progress=false"])
    assert code != 0
    assert not (tmp_path).joinpath("runs").exists()
    assert "127.0.0.1:9" in capsys.readouterr().err


def test_cli_reports_bad_config_and_missing_dataset(tmp_path, capsys):
    assert main(["train", str(SINUSOID), "algorithm.inner_lr=abc"]) == 2
    assert "algorithm.inner_lr" in capsys.readouterr().err
    assert main(["train", str(SINUSOID), f"data.dataset={tmp_path / 'nope'}",
                 "tracking.enabled=false", f"train.output_dir={tmp_path}"]) == 2
    assert "no such dataset directory" in capsys.readouterr().err


def test_eval_rejects_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    bogus = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(2)}, bogus)
    assert main(["eval", str(bogus)]) == 2
    assert "not a metadist checkpoint" in capsys.readouterr().err


def test_eval_rejects_parameters_that_do_not_fit_the_model(tmp_path, capsys):
    result = train(sinusoid(tmp_path, "train.steps=2", "eval.episodes=5"))
    state = load_checkpoint(result["checkpoint"])
    state["params"]["head.weight"] = torch.zeros(1, 7)
    state.pop("format")
    from metadist.training.checkpoint import save_checkpoint

    bad = save_checkpoint(tmp_path / "bad.pt", state)
    assert main(["eval", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.pt" in err and "wrong shape ['head.weight']" in err


def test_bf16_precision_autocasts_meta_training_only(tmp_path):
    common = ["train.steps=15", "train.inner_loop=loop", "eval.episodes=50"]
    fp32 = train(sinusoid(tmp_path / "a", *common))
    bf16 = train(sinusoid(tmp_path / "b", *common, "train.precision=bf16"))
    init = sinusoid(tmp_path / "c", "train.steps=0")
    p0 = load_checkpoint(train(init)["checkpoint"])["params"]
    a = load_checkpoint(fp32["checkpoint"])["params"]
    b = load_checkpoint(bf16["checkpoint"])["params"]
    moved = torch.cat([(a[k] - p0[k]).flatten() for k in p0])
    apart = torch.cat([(b[k] - a[k]).flatten() for k in p0])
    assert all(v.dtype == torch.float32 for v in b.values())  # master weights stay fp32
    # bf16 rounding moves the trajectory (autocast was on), but not off course.
    assert 1e-4 < apart.norm() / moved.norm() < 0.3
    assert load_checkpoint(bf16["checkpoint"])["config"]["train"]["precision"] == "bf16"
    with pytest.raises(Exception, match=r"train\.precision='fp16' is not one of"):
        sinusoid(tmp_path, "train.precision=fp16")


def test_derivative_order_annealing_switches_to_second_order_at_the_configured_step(tmp_path):
    # MAML++: the first algorithm.first_order_steps meta-steps are first order.
    common = ["train.steps=4", "train.checkpoint_every=1", "train.inner_loop=loop",
              "algorithm.inner_steps=2", "algorithm.meta_batch_size=4", "eval.episodes=5"]

    def params_at(run: dict, step: int) -> dict:
        return load_checkpoint(Path(run["run_dir"]) / "checkpoints" /
                               f"step-{step:07d}.pt")["params"]

    annealed = train(sinusoid(tmp_path / "a", *common, "algorithm.first_order_steps=2"))
    first = train(sinusoid(tmp_path / "b", *common, "algorithm.first_order=true"))
    second = train(sinusoid(tmp_path / "c", *common),
                   resume=Path(annealed["run_dir"]) / "checkpoints" / "step-0000002.pt")
    for k in params_at(first, 2):
        torch.testing.assert_close(params_at(annealed, 2)[k], params_at(first, 2)[k],
                                   rtol=0, atol=0)  # first order up to step 2
        # then second order: step 3 is MAML's step from the step-2 state
        torch.testing.assert_close(params_at(annealed, 3)[k], params_at(second, 3)[k],
                                   rtol=0, atol=0)
    assert any(not torch.equal(params_at(annealed, 3)[k], params_at(first, 3)[k])
               for k in params_at(first, 3))


def test_a_cosine_outer_schedule_anneals_beta_along_a_half_cosine(tmp_path):
    run = train(sinusoid(tmp_path, "train.steps=8", "train.log_every=1",
                         "algorithm.outer_lr=0.001", "algorithm.outer_lr_final=0.0001",
                         "algorithm.outer_lr_schedule=cosine", "eval.episodes=5"))
    history = json.loads((Path(run["run_dir"]) / "history.json").read_text())
    rates = [h["outer_lr"] for h in history]  # after each step: the next step's β
    expected = [1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * s / 8)) for s in range(1, 9)]
    assert rates == pytest.approx(expected, rel=1e-6)


def test_vmap_evaluates_a_training_step_s_worth_of_episodes_at_a_time(tmp_path,
                                                                      omniglot_small,
                                                                      monkeypatch):
    # 50 episodes of 84x84 images at once under vmap took 22 GB; a training step's tasks
    # are known to fit.
    import metadist.training.evaluate as evaluate

    seen = []
    scores = evaluate.adapted_scores

    def spy(model, params, batch, step, **kwargs):
        seen.append((batch.support_x.shape[0], kwargs["inner_loop"], kwargs["chunk"]))
        return scores(model, params, batch, step, **kwargs)

    monkeypatch.setattr(evaluate, "adapted_scores", spy)
    for path, chunk in (("vmap", 4), ("loop", 0)):
        seen.clear()
        cfg = load_config(ROOT / "configs" / "omniglot_5w1s_maml.yaml", [
            f"data.dataset={omniglot_small}", f"train.output_dir={tmp_path / path}",
            "train.steps=1", "algorithm.meta_batch_size=4", "train.val_every=0",
            "eval.episodes=16", "eval.batch_size=16", "train.progress=false",
            "tracking.enabled=false", f"train.inner_loop={path}",
        ])
        train(cfg)
        assert seen == [(16, path, chunk)]
