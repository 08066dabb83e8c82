"""Tuning sweeps: Ray Tune searches the config space (α, β, K, anything else), each trial a
full meta-training run by the same worker loop as ``metadist train``, ASHA stops the
weak trials on validation accuracy, and MLflow gets one parent run per sweep with a
nested run per trial.

The sweep, top to bottom (``run_sweep``): the search space from ``tune.space``, a parent
MLflow run, ``Tuner.fit`` (or ``Tuner.restore`` to resume a killed sweep), the best
trial chosen on its validation score, its config written as a ready-to-run YAML file,
its model meta-tested on the held-out test classes and registered in the Model Registry.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import yaml
from omegaconf import OmegaConf
from optuna.samplers import TPESampler
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from metadist.config import (
    Config,
    ConfigError,
    SearchDimension,
    TuneConfig,
    absolute_paths,
    config_from_dict,
    flatten,
    to_dict,
    uses_ray,
)
from metadist.runners.preflight import run_cpus
from metadist.runners.ray_train import init_ray, local_copy, reporter, train_on_ray
from metadist.tracking import (
    child_run_id,
    end_run,
    end_running_children,
    resolve_tracking_uri,
    tracked_run,
)
from metadist.training.evaluate import evaluate_checkpoint
from metadist.training.loop import Hooks, train

SWEEP_FILE = "sweep.json"  # the parent MLflow run and the config the sweep was started with
TRIAL_TAG = "metadist.trial_id"


# -- the search space -------------------------------------------------------------------


def search_space(config: Config) -> dict[str, Any]:
    """``tune.space`` as Ray Tune domains, keyed by dotted config key."""
    if not config.tune.space:
        raise ConfigError("tune.space is empty: name at least one config key to search")
    every, val = config.train.checkpoint_every, config.train.val_every
    if val < 1:
        raise ConfigError("train.val_every must be >= 1 in a sweep: trials are compared and "
                          "stopped on their validation scores")
    if every % val:
        # Each report to Tune must carry the validation score the scheduler and the
        # search algorithm read, so trials checkpoint only at validation steps.
        raise ConfigError(f"train.checkpoint_every={every} must be a multiple of "
                          f"train.val_every={val} in a sweep")
    known = {k for k in flatten(config) if not k.startswith("tune.")}
    space = {}
    for key, dim in config.tune.space.items():
        if key not in known:
            raise ConfigError(f"tune.space: {key!r} is not a config key")
        space[key] = _domain(key, dim)
    return space


def _domain(key: str, dim: SearchDimension):
    where = f"tune.space.{key}"
    if dim.type == "choice":
        if not dim.values:
            raise ConfigError(f"{where}: type choice needs a non-empty list of values")
        return tune.choice(list(dim.values))
    if dim.low is None or dim.high is None:
        raise ConfigError(f"{where}: type {dim.type} needs low and high")
    if dim.type == "loguniform":
        if not 0 < dim.low < dim.high:
            raise ConfigError(f"{where}: loguniform needs 0 < low < high, got {dim.low}, "
                              f"{dim.high}")
        return tune.loguniform(dim.low, dim.high)
    if dim.type == "uniform":
        if not dim.low < dim.high:
            raise ConfigError(f"{where}: uniform needs low < high, got {dim.low}, {dim.high}")
        return tune.uniform(dim.low, dim.high)
    if dim.type == "int":
        if dim.low != int(dim.low) or dim.high != int(dim.high) or dim.low > dim.high:
            raise ConfigError(f"{where}: int needs integers low <= high, got {dim.low}, "
                              f"{dim.high}")
        return tune.randint(int(dim.low), int(dim.high) + 1)  # Tune's high is exclusive
    raise ConfigError(
        f"{where}: type {dim.type!r} is not one of ['loguniform', 'uniform', 'int', 'choice']"
    )


def describe(dim: SearchDimension) -> str:
    """``loguniform(0.05, 1.0)``, ``int(1, 3)``, ``choice(['maml', 'fomaml'])``."""
    if dim.type == "choice":
        return f"choice({list(dim.values or [])})"
    return f"{dim.type}({dim.low:g}, {dim.high:g})"


def trial_config(base: dict[str, Any], sampled: dict[str, Any]) -> Config:
    """The base config with the trial's sampled values, checked like any config."""
    conf = OmegaConf.create(base)
    for key, value in sampled.items():
        OmegaConf.update(conf, key, value, merge=False)
    return config_from_dict(OmegaConf.to_container(conf))


def metric_and_mode(config: Config) -> tuple[str, str]:
    metric = config.tune.metric
    if metric == "auto":
        metric = "val_mse" if config.data.dataset == "sinusoid" else "val_accuracy"
    if not metric.startswith(("val_", "train_")):
        raise ConfigError(f"tune.metric={metric!r}: use a reported metric such as "
                          "val_accuracy, val_mse or train_loss")
    return metric, "max" if metric.endswith("accuracy") else "min"


# -- one trial ----------------------------------------------------------------------------


def run_trial(sampled: dict[str, Any], *, base: dict[str, Any], sweep_dir: str,
              parent_run_id: str | None, tracking_uri: str | None) -> None:
    """A Tune function trainable: one meta-training run of the sampled config, on this
    trial's process or, with ``workers > 1``, on its own Ray Train workers."""
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base, sampled)
    # Trials are chosen on validation; the test classes are for the chosen one only.
    cfg.train.final_test = False
    cfg.train.progress = False
    cfg.tracking.run_name = f"{Path(sweep_dir).name}-{trial_id}"
    run_dir = Path(sweep_dir) / "trials" / trial_id

    tracked = tracked_run(
        cfg, when=parent_run_id is not None, tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
        run_id=parent_run_id and child_run_id(tracking_uri, parent_run_id, TRIAL_TAG,
                                              trial_id),  # a restarted trial's own run
        tags={TRIAL_TAG: trial_id, "trial_params": json.dumps(sampled)},
    )
    with tracked as tracker:
        if uses_ray(cfg):
            # Same run directory, same Ray Train run: a restarted trial continues from it.
            train_on_ray(cfg, mlflow_run_id=tracker.run_id if tracker else None,
                         tracking_uri=tracking_uri, run_dir=run_dir,
                         callbacks=(TuneReportCallback(),))
        else:
            cfg.train.threads = cfg.train.threads or max(1, int(cfg.tune.cpus_per_trial))
            restored = tune.get_checkpoint()
            train(cfg, tracker, local_copy(restored, run_dir) if restored else None,
                  run_dir=run_dir,
                  hooks=Hooks(report=reporter(tune.report, tune.Checkpoint)))


# -- the sweep ------------------------------------------------------------------------------


def sweep_dir_of(config: Config) -> Path:
    storage = config.tune.storage_path or str(Path(config.train.output_dir) / "sweeps")
    return Path(storage).resolve() / (config.tune.name or config.name)


def run_sweep(config: Config, *, resume: bool = False) -> dict[str, Any]:
    """Run (or, with ``resume``, finish) the sweep of ``config.tune`` and return its
    summary: the best trial, its config file, its meta-test result, the registered model."""
    if config.tracking.register_model:
        raise ConfigError(
            f"tracking.register_model={config.tracking.register_model!r} is for `metadist "
            "train`: a sweep registers its best model as tune.model_name (default: the "
            "sweep's name)")
    # Tune saves the sweep's state this often; a killed sweep loses at most this much.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    space = search_space(config)
    metric, mode = metric_and_mode(config)
    sweep_dir = sweep_dir_of(config)
    portable = to_dict(config)
    base = trial_base(config)
    state = start_or_resume(sweep_dir, portable, resume)
    # Fails here, before any trial, if MLflow is unreachable.
    with parent_run(config, sweep_dir, resume) as tracker:
        if tracker is not None:
            if not resume:
                log_search_params(tracker, config)
            state["parent_run_id"], state["tracking_uri"] = tracker.run_id, tracker.uri
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / SWEEP_FILE).write_text(json.dumps(state, indent=2))
        return sweep(config, state, space, metric, mode, sweep_dir, portable, base, tracker,
                     resume)


def sweep(config, state, space, metric, mode, sweep_dir, portable, base, tracker, resume):
    per_trial = config.tune.cpus_per_trial + (run_cpus(config) if uses_ray(config) else 0)
    concurrent = config.tune.max_concurrent or config.tune.num_samples
    init_ray(config, need_cpus=per_trial * min(concurrent, config.tune.num_samples))

    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial, base=base, sweep_dir=str(sweep_dir),
            parent_run_id=state.get("parent_run_id"), tracking_uri=state.get("tracking_uri"),
        ),
        {"CPU": config.tune.cpus_per_trial},
    )
    if config.tune.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="step", max_t=config.train.steps,
            grace_period=config.tune.grace_period or config.train.val_every or 1,
            reduction_factor=config.tune.reduction_factor,
            # A trial that reaches train.steps finishes on its own (artifacts, final run
            # status) instead of being stopped at its last report.
            stop_last_trials=False,
        )
    else:
        scheduler = FIFOScheduler()
    # Each search carries the trial limit itself: TuneConfig's max_concurrent_trials wraps
    # only a Searcher, and handed a variant generator Ray warns and runs every trial at once.
    limit = config.tune.max_concurrent  # 0: as many as the resources allow
    if config.tune.search == "tpe":
        search = OptunaSearch(sampler=TPESampler(seed=config.tune.seed))
        if limit:
            search = ConcurrencyLimiter(search, max_concurrent=limit)
    else:
        search = BasicVariantGenerator(random_state=config.tune.seed, max_concurrent=limit)
    callbacks = [MarkStopped(state.get("tracking_uri"), state.get("parent_run_id"),
                             config.train.steps)] if tracker is not None else []
    if resume:
        tuner = tune.Tuner.restore(str(sweep_dir), trainable=trainable,
                                   resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=metric, mode=mode, search_alg=search, scheduler=scheduler,
                num_samples=config.tune.num_samples,
            ),
            run_config=tune.RunConfig(
                name=sweep_dir.name, storage_path=str(sweep_dir.parent), callbacks=callbacks,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=1,
            ),
        )
    with signals_interrupt_tune() as received:
        grid = tuner.fit()
    if received:
        ray.shutdown()  # the interrupted trials' processes end here, before their runs do
        stop_interrupted(received[0], config, grid, state, sweep_dir)
    summary = summarize_sweep(config, grid, metric, mode, sweep_dir, portable, tracker)
    ray.shutdown()
    return summary


@contextlib.contextmanager
def signals_interrupt_tune() -> Iterator[list[int]]:
    """Within this block SIGTERM and Ctrl-C interrupt the sweep as Tune's own interrupt
    does: the trials stop, Tune saves the sweep's state and ``Tuner.fit`` returns. The
    yielded list then holds the signal, and the caller must not take the partial sweep for
    a finished one (Tune's own Ctrl-C handler returns the same way, and nothing told the
    two apart). A second signal, or one before Tune is running, unwinds at once.

    Tune does not handle SIGTERM: Ray's handler aborted the driver mid-sweep (exit -6), with
    no last state saved and the running trials' MLflow runs left RUNNING. Tune's own pieces
    do not fit: its SIGINT handler returns from ``fit`` as if the sweep had finished and
    tells no one, and a ``Stopper`` ends the trials TERMINATED, so ``Tuner.restore`` would
    not carry them on. What fits is the handler ``Tuner.fit`` installs for SIGUSR1 (it
    interrupts as Ctrl-C does and keeps the trials resumable): this block sets SIGUSR1 to
    the default, so a handler found there while the sweep runs is Tune's, and calls it.
    ``test_sweep`` shows both signals end the sweep resumable and unsummarised."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def interrupt(signum: int, frame: object) -> None:
        tune_handler = signal.getsignal(signal.SIGUSR1)
        if received or not callable(tune_handler):  # a second signal, or Tune not running
            raise SystemExit(128 + signum)
        received.append(signum)
        print(f"metadist: {signal.Signals(signum).name}: stopping the sweep; its trials "
              "resume from their last checkpoints with --resume (signal again to exit at once)",
              file=sys.stderr, flush=True)
        tune_handler(signum, frame)

    # Tune's SIGINT handler would interrupt with no word to this process; a SIGUSR1 handler
    # left by an earlier sweep in this process would set that sweep's flag, not this one's.
    disabled = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if disabled is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER")
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = disabled


def stop_interrupted(signum: int, config: Config, grid, state: dict[str, Any],
                     sweep_dir: Path) -> None:
    """End the runs of the trials the interrupt stopped as KILLED where their processes
    could not, and exit as the signal asks; ``--resume`` carries on in the same runs."""
    if state.get("parent_run_id"):
        end_running_children(state["tracking_uri"], state["parent_run_id"], "KILLED")
    finished = sum(1 for r in grid if ran_full_length(r, config.train.steps))
    print(f"metadist: sweep {sweep_dir} stopped by {signal.Signals(signum).name}, "
          f"{finished} of {config.tune.num_samples} trials ran their full length; the same "
          "command with --resume runs the rest, from their last checkpoints",
          file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


def trial_base(config: Config) -> dict[str, Any]:
    """The config trials start from: they run in other working directories, so its
    relative paths are made absolute and the tracking store is named explicitly."""
    fixed: dict[str, Any] = dict(absolute_paths(config))
    if config.tracking.enabled:
        fixed["tracking.tracking_uri"] = resolve_tracking_uri(config)
    return to_dict(trial_config(to_dict(config), fixed))


def start_or_resume(sweep_dir: Path, config: dict[str, Any], resume: bool) -> dict[str, Any]:
    """A new sweep never lands on an old one; a resumed one must be the same sweep."""
    state_file = sweep_dir / SWEEP_FILE
    if resume:
        if not state_file.is_file():
            raise FileNotFoundError(f"no sweep to resume at {sweep_dir} ({SWEEP_FILE} missing)")
        state = json.loads(state_file.read_text())
        before, now = _flat(state["config"]), _flat(config)
        changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        if changed:
            raise ConfigError(
                f"sweep {sweep_dir} was started with a different config ({', '.join(changed)} "
                "differ): resume it with the same config and overrides, or start a new sweep "
                "with tune.name=..."
            )
        return state
    if sweep_dir.exists() and any(sweep_dir.iterdir()):
        raise FileExistsError(
            f"sweep {sweep_dir} already exists: resume it with --resume, or choose another "
            "tune.name=..."
        )
    return {"config": config}


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    return flatten(config_from_dict(config))


def parent_run(config: Config, sweep_dir: Path, resume: bool):
    """The sweep's MLflow run (``tracked_run``): a new one, or on resume the one it had."""
    state_file = sweep_dir / SWEEP_FILE
    if resume and state_file.is_file():
        state = json.loads(state_file.read_text())
        if state.get("parent_run_id"):
            return tracked_run(config, tracking_uri=state["tracking_uri"],
                               run_id=state["parent_run_id"])
    cfg = config_from_dict(to_dict(config))
    cfg.tracking.run_name = config.tracking.run_name or sweep_dir.name
    return tracked_run(cfg, tags={"sweep": "true", "search": config.tune.search,
                                  "scheduler": config.tune.scheduler})


def log_search_params(tracker, config: Config) -> None:
    """The parent's params: the base config (logged on start) plus the search itself."""
    tracker.log_params({
        **{f"tune.space.{k}": describe(d) for k, d in config.tune.space.items()},
        **{f"tune.{k}": str(getattr(config.tune, k)) for k in vars(TuneConfig())
           if k != "space"},
    })


class MarkStopped(tune.Callback):
    """Tags the MLflow runs of trials that ASHA stopped with the step they reached, and ends
    them as KILLED (the trial's own process may be gone before it can)."""

    def __init__(self, tracking_uri: str, parent_run_id: str, max_steps: int):
        self.uri, self.parent, self.max_steps = tracking_uri, parent_run_id, max_steps

    def on_trial_complete(self, iteration, trials, trial, **info):
        step = int((trial.last_result or {}).get("step", 0))
        if step >= self.max_steps:
            return
        run_id = child_run_id(self.uri, self.parent, TRIAL_TAG, trial.trial_id)
        if run_id is not None:
            end_run(self.uri, run_id, "KILLED", {"stopped_early_at_step": step})


# -- the outcome ------------------------------------------------------------------------------


def ran_full_length(result, steps: int) -> bool:
    """A trial that neither failed nor was stopped (by ASHA, or by an interrupt) early."""
    return not result.error and (result.metrics or {}).get("step", 0) >= steps


def summarize_sweep(config: Config, grid, metric: str, mode: str, sweep_dir: Path,
                    portable: dict[str, Any], tracker) -> dict[str, Any]:
    """Choose the best trial on validation, write its config, meta-test it, register it."""
    trials = []
    for r in grid:
        last = r.metrics or {}
        trials.append({
            "trial_id": last.get("trial_id"), **{f"param.{k}": v for k, v in r.config.items()},
            "steps_done": last.get("step"), metric: last.get(metric),
            "stopped_early": (last.get("step") or 0) < config.train.steps,
            "error": str(r.error) if r.error else "",
        })
    # Among trials that ran their full length: a trial ASHA cut off has no final model.
    done = [r for r in grid if ran_full_length(r, config.train.steps) and metric in r.metrics]
    if not done:
        raise RuntimeError(f"no trial of sweep {sweep_dir} completed; see {sweep_dir}/trials.csv")
    write_trials_csv(trials, sweep_dir / "trials.csv")
    sign = 1 if mode == "max" else -1
    best = max(done, key=lambda r: sign * r.metrics[metric])
    best_config = trial_config(portable, best.config)
    best_config.name = f"{sweep_dir.name}-best"
    best_config.tune = TuneConfig()
    best_file = sweep_dir / "best_config.yaml"
    written = {k: v for k, v in to_dict(best_config).items() if k != "tune"}
    best_file.write_text(
        f"# Best trial {best.metrics.get('trial_id')} of sweep {sweep_dir.name}, chosen on "
        f"{metric} ({mode}) = {best.metrics.get(metric)}.\n"
        f"# Re-run: metadist train {best_file}\n" + yaml.safe_dump(written, sort_keys=False)
    )
    summary: dict[str, Any] = {
        "sweep_dir": str(sweep_dir), "best_config": str(best_file),
        "best_trial": best.metrics.get("trial_id"), "best_params": best.config,
        "metric": metric, "mode": mode, f"best_{metric}": best.metrics.get(metric),
        "trials": trials,
    }
    checkpoint = best_checkpoint(best, sweep_dir)
    summary["best_checkpoint"] = checkpoint
    if config.tune.final_test:
        # The one look at the held-out test classes, for the configuration already chosen.
        summary["test"] = evaluate_checkpoint(checkpoint, episodes=config.eval.episodes)
    if tracker is not None:
        summary["registered_model"] = register_model(checkpoint,
                                                     config.tune.model_name or sweep_dir.name)
    (sweep_dir / "best_result.json").write_text(json.dumps(summary, indent=2, default=str))
    if tracker is not None:
        log_sweep(tracker, grid, metric, summary, sweep_dir)
    return summary


def best_checkpoint(best, sweep_dir: Path) -> str:
    final = sweep_dir / "trials" / best.metrics["trial_id"] / "checkpoints" / "final.pt"
    if final.is_file():  # the trial ran on this machine (or the sweep is on shared storage)
        return str(final)
    if best.checkpoint is not None:  # trials on this process report their checkpoints to Tune
        return local_copy(best.checkpoint, sweep_dir / "best")
    # Trials on Ray Train workers: the checkpoint Ray Train stored, named in the metrics.
    path = Path(best.metrics["checkpoint_path"]) / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"the best trial's checkpoint {path} is missing")
    return str(path)


def write_trials_csv(trials: list[dict[str, Any]], path: Path) -> None:
    keys = list(dict.fromkeys(k for t in trials for k in t))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(trials)


def log_sweep(tracker, grid, metric: str, summary: dict[str, Any], sweep_dir: Path) -> None:
    """The parent run: the best trial, its test result, the trials table, the sweep plot."""
    tracker.set_tags({"best_trial": summary["best_trial"]})
    metrics = {f"best_{metric}": summary[f"best_{metric}"], "trials": len(summary["trials"]),
               "trials_stopped_early": sum(t["stopped_early"] for t in summary["trials"])}
    test = summary.get("test")
    if test is not None:
        metrics.update({f"test_{test['metric']}": test["mean"],
                        f"test_{test['metric']}_ci95": test["ci95"]})
    tracker.log_metrics(metrics, step=0)
    for name in ("best_config.yaml", "best_result.json", "trials.csv"):
        tracker.log_artifact(sweep_dir / name)
    plot = plot_sweep(grid, metric, sweep_dir / "sweep.png", title=sweep_dir.name)
    if plot is not None:
        tracker.log_artifact(plot)


def register_model(checkpoint: str, name: str) -> dict[str, Any]:
    """The best model as an MLflow pyfunc model of the sweep's run (the active one),
    registered as ``name``: one few-shot task per request (docs/serving.md)."""
    # Imported here: MLflow's model machinery is needed once, at the end of a sweep.
    from metadist.serving.mlflow_model import log_learner

    return log_learner(checkpoint, name)


def plot_sweep(grid, metric: str, path: Path, title: str = "") -> Path | None:
    """Every trial's validation curve on one plot: where ASHA cut trials off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for r in grid:
        df = r.metrics_dataframe
        if df is None or metric not in df or "step" not in df:
            continue
        df = df.dropna(subset=[metric])
        label = ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in r.config.items())
        ax.plot(df["step"], df[metric], marker="o", ms=3, lw=1, label=label)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("meta-step")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
