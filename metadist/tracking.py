"""MLflow tracking of a run: params (the flattened config), tags, curves, artifacts.
With ``serving.mlflow_model`` (the registered pyfunc model) the only module of metadist
that imports MLflow: every run, sweep and trial opens its MLflow run through
``tracked_run``, and the launchers' other MLflow operations (a sweep's trials, a
reproduced row's extra metrics) are functions here.

The embedded default is a SQLite store in the working directory (MLflow 3 refuses a bare
file store); ``tracking.tracking_uri`` or ``$MLFLOW_TRACKING_URI`` point elsewhere, e.g.
at an ``mlflow server`` on 127.0.0.1.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import subprocess
import time
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from filelock import FileLock

from metadist.config import Config, flatten, redact


def resolve_tracking_uri(config: Config | None = None) -> str:
    """The store's URI, without credentials: a ``user:password@`` in
    ``$MLFLOW_TRACKING_URI`` moves to MLflow's own ``MLFLOW_TRACKING_USERNAME`` /
    ``MLFLOW_TRACKING_PASSWORD`` (basic auth), so the URI can be printed and recorded.
    (A config's URI cannot carry them: ``config.validate`` refuses it.) No config: the
    environment's store, else the default."""
    uri = ((config.tracking.tracking_uri if config is not None else None)
           or os.environ.get("MLFLOW_TRACKING_URI")
           or f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https") and (parts.username or parts.password):
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(parts.username or ""))
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(parts.password or ""))
        uri = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    return uri


def artifact_root(uri: str) -> str | None:
    """Where a local store keeps its runs' artifacts: beside the database, never relative
    to the working directory of the process that happens to create the experiment (MLflow's
    default, ./mlruns: a job's working directory is deleted with its cluster). None: a
    server chooses (``--artifacts-destination``)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


class TrackingError(RuntimeError):
    pass


# The experiment tag MLflow 3 keeps an experiment's kind in, and the kind of model
# training ("Machine learning"; genai_development is for the traces and evaluations of LLM
# apps). The UI's experiment-kind selector writes it and the UI opens an experiment on its
# runs or on its traces by it; MLflow 3.17's UI instead follows its sidebar switch (GenAI /
# Model training, kept by the browser), which docs/tracking.md has the user set.
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"


def mark_model_training(uri: str, experiment) -> None:
    """Tag ``experiment`` (an ``mlflow.entities.Experiment``) as a model-training one,
    once: an experiment created elsewhere (by ``set_experiment``, on a server, before
    metadist tagged experiments) gets the tag at its first metadist run, and a kind
    someone already set is kept. Only warns on failure: a server may refuse the edit."""
    if EXPERIMENT_KIND in experiment.tags:
        return
    from mlflow import MlflowClient

    try:
        MlflowClient(uri).set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND,
                                             MODEL_TRAINING)
    except Exception as err:
        warnings.warn(f"MLflow experiment {experiment.name!r}: could not tag it as model "
                      f"training ({err})", stacklevel=3)


def first_use_lock(uri: str) -> contextlib.AbstractContextManager:
    """Serialises the first use of a local SQLite store across processes: MLflow creates
    and migrates the tables when a process first opens it, and two runs started at once
    on a fresh store collide in that migration (``Online migration expected to match one
    row ... 0 found``)."""
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    return FileLock(uri.removeprefix("sqlite:///") + ".lock")


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """An MLflow server that does not answer is an error now, not after MLflow's retries
    (minutes of back-off) and not after the compute has been spent."""
    if not uri.startswith(("http://", "https://")):
        return
    request = urllib.request.Request(uri.rstrip("/") + "/health")
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if user:  # as MLflow's own client will authenticate
        pair = f"{user}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}".encode()
        request.add_header("Authorization", "Basic " + base64.b64encode(pair).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            pass
    except OSError as err:
        raise TrackingError(
            f"MLflow tracking server {redact(uri)} is unreachable ({err}). Start it, point "
            "tracking.tracking_uri / MLFLOW_TRACKING_URI elsewhere, or set "
            "tracking.enabled=false."
        ) from None


@contextlib.contextmanager
def tracked_run(config: Config, *, when: bool = True, **kwargs) -> Iterator[MLflowTracker | None]:
    """The MLflow run around a block, or None when ``tracking.enabled`` is false or this
    process does not track (``when=False``: ranks > 0). ``kwargs`` go to ``MLflowTracker``.
    The store is checked before the block runs, so an unreachable one fails before any
    compute is spent; the run ends FINISHED, KILLED (interrupted) or FAILED with it."""
    if not (when and config.tracking.enabled):
        yield None
        return
    with MLflowTracker(config, **kwargs) as tracker:
        yield tracker


class MLflowTracker:
    """One MLflow run. A server lost mid-run never stops training: metrics that fail to
    log are kept and retried every ``retry_every`` seconds (not at every step: each try
    against a dead server costs MLflow's request timeout), the user is warned once per
    outage, and whatever could not be logged by the end is named, with where it is kept."""

    retry_every = 30.0

    def __init__(
        self, config: Config, *, tracking_uri: str | None = None, run_id: str | None = None,
        parent_run_id: str | None = None, tags: dict[str, str] | None = None,
    ) -> None:
        """``run_id``: attach to a run opened elsewhere (the driver's, for Ray Train's
        rank 0; a restarted trial's own). ``parent_run_id``: open a nested run under it
        (a sweep's trial)."""
        # MLflow's defaults retry a failed request for minutes with exponential back-off,
        # which would stall training at every step while a server is down.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        import mlflow

        self.mlflow = mlflow
        self.config = config
        self.retry_at = 0.0  # monotonic time of the next try while the server is away
        self.outage = False
        self.uri = tracking_uri or resolve_tracking_uri(config)
        self.attach_to = run_id
        self.parent_run_id = parent_run_id
        self.tags = tags or {}
        self.pending: list[tuple[dict[str, float], int]] = []
        check_reachable(self.uri)
        mlflow.set_tracking_uri(self.uri)
        try:
            # Fails fast, before any compute is spent, when the store is unreachable.
            with first_use_lock(self.uri):
                name = config.tracking.experiment
                root = artifact_root(self.uri)
                if root is not None and mlflow.get_experiment_by_name(name) is None:
                    folder = re.sub(r"[^A-Za-z0-9._-]", "_", name)  # one plain folder
                    mlflow.create_experiment(name, artifact_location=f"{root}/{folder}",
                                             tags={EXPERIMENT_KIND: MODEL_TRAINING})
                experiment = mlflow.set_experiment(name)
        except Exception as err:
            raise TrackingError(
                f"MLflow tracking store {redact(self.uri)!r} is not usable: {err}. Set "
                "tracking.tracking_uri / MLFLOW_TRACKING_URI, or tracking.enabled=false."
            ) from None
        mark_model_training(self.uri, experiment)

    def __enter__(self) -> MLflowTracker:
        cfg = self.config
        if self.attach_to is not None:
            self.run = self.mlflow.start_run(run_id=self.attach_to)
            return self
        self.run = self.mlflow.start_run(
            run_name=cfg.tracking.run_name or cfg.name, parent_run_id=self.parent_run_id,
            nested=self.parent_run_id is not None, tags=self.tags,
        )
        self.mlflow.log_params(run_params(cfg, pretraining=self.tags.get("stage") == "pretrain"))
        self.mlflow.set_tags(run_tags(cfg))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.retry_at = 0.0
        self.flush()
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, SystemExit | KeyboardInterrupt):
            status = "KILLED"  # interrupted, or a trial a tuning scheduler stopped
        else:
            status = "FAILED"
        if self.pending:
            warnings.warn(
                f"MLflow run {self.run_id}: {len(self.pending)} metric records could not be "
                "logged (server unreachable); they are in the run directory's history.json",
                stacklevel=2,
            )
        try:
            self.mlflow.end_run(status=status)
        except Exception as err:
            warnings.warn(f"MLflow run {self.run_id} could not be ended ({err}); it stays "
                          "RUNNING in MLflow", stacklevel=2)

    def note_restart(self, step: int) -> None:
        """Make a restart visible in the run: a counter tag and the step it resumed from."""
        run = self.mlflow.get_run(self.run_id)
        restarts = int(run.data.tags.get("restarts", "0")) + 1
        self.mlflow.set_tags({"restarts": restarts, f"restart_{restarts}_from_step": step})

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.pending.append((metrics, step))
        self.flush()

    def flush(self) -> None:
        if not self.pending or time.monotonic() < self.retry_at:
            return
        kept = len(self.pending)
        while self.pending:
            metrics, step = self.pending[0]
            try:
                self.mlflow.log_metrics(metrics, step=step)
            except Exception as err:
                self.retry_at = time.monotonic() + self.retry_every
                if not self.outage:
                    warnings.warn(
                        f"MLflow logging failed ({err}); training goes on, metric records "
                        f"are kept and retried every {self.retry_every:.0f} s",
                        stacklevel=3,
                    )
                self.outage = True
                return
            self.pending.pop(0)
        if self.outage:
            warnings.warn(f"MLflow reachable again: {kept} kept metric records logged",
                          stacklevel=3)
            self.outage = False

    def log_params(self, params: dict[str, Any]) -> None:
        self.mlflow.log_params(params)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.mlflow.set_tags(tags)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        try:
            self.mlflow.log_artifact(str(path), artifact_path)
        except Exception as err:
            warnings.warn(f"MLflow could not store artifact {path} ({err}); the file "
                          "stays where it is", stacklevel=2)

    def log_result(self, result: dict[str, Any], history: list[dict[str, float]]) -> None:
        run_dir = Path(result["run_dir"])
        plot = plot_curves(history, run_dir / "curves.png", title=self.config.name)
        rates = plot_learned_rates(history, run_dir / "learned_rates.png",
                                   title=self.config.name)
        for name in ("config.yaml", "result.json", "history.json"):
            self.log_artifact(run_dir / name)
        for path in (plot, rates):
            if path is not None:
                self.log_artifact(path)
        self.log_artifact(result["checkpoint"], "checkpoints")

    def log_stop(self, step: int, checkpoint: Path) -> None:
        """A run stopped before its end (SIGTERM) names the checkpoint to resume from, and
        keeps a copy with the run: a preempted node may take its run directory with it."""
        try:
            self.mlflow.set_tags({"stopped_after_step": step,
                                  "resume_checkpoint": str(checkpoint)})
        except Exception as err:
            warnings.warn(f"MLflow run {self.run_id}: could not tag the stop ({err})",
                          stacklevel=2)
        self.log_artifact(checkpoint, "checkpoints")


# -- runs other than this process's own: a sweep's trials, a finished run ----------------


def child_run_id(uri: str, parent_run_id: str, tag: str, value: str) -> str | None:
    """The nested run of ``parent_run_id`` tagged ``tag=value``, if there is one."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`{tag}` = '{value}'",
    )
    return runs[0].info.run_id if runs else None


def end_running_children(uri: str, parent_run_id: str, status: str = "KILLED") -> None:
    """End the nested runs of ``parent_run_id`` still RUNNING (their processes are gone)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    for run in client.search_runs(
            [parent.info.experiment_id],
            f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'"):
        client.set_terminated(run.info.run_id, status)


def end_run(uri: str, run_id: str, status: str, tags: dict[str, Any]) -> None:
    """Tag and end a run another process opened."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status)


def log_to_run(uri: str, run_id: str, metrics: dict[str, float],
               params: dict[str, Any]) -> None:
    """Add metrics and params to a run after it ended; a failure only warns (the caller
    keeps what it logs in its own record)."""
    from mlflow import MlflowClient

    try:
        client = MlflowClient(uri)
        for key, value in metrics.items():
            client.log_metric(run_id, key, value)
        for key, value in params.items():
            client.log_param(run_id, key, value)
    except Exception as err:
        warnings.warn(f"MLflow run {run_id}: could not log {sorted(metrics)} ({err})",
                      stacklevel=2)


def run_params(config: Config, pretraining: bool = False) -> dict[str, str]:
    """The flattened config as MLflow params: the sections the run used (``tune`` belongs
    to sweeps, ``pretrain`` to pre-training runs)."""
    unused = ("tune.",) if pretraining else ("tune.", "pretrain.")
    return {k: str(v) for k, v in flatten(config).items() if not k.startswith(unused)}


def run_tags(config: Config, where: Path | None = None) -> dict[str, Any]:
    if where is None and os.environ.get("METADIST_GIT_COMMIT"):
        # A submitted job's shipped copy has no history: submit recorded what it shipped.
        commit = os.environ["METADIST_GIT_COMMIT"]
        edited = os.environ.get("METADIST_GIT_UNCOMMITTED", "unknown")
    else:
        commit = git_commit(where or PACKAGE_DIR)
        # Without a commit (a wheel, a copy) nothing says the tree was clean.
        edited = ("unknown" if commit == "unknown"
                  else ", ".join(git_uncommitted(where or PACKAGE_DIR)) or "none")
    return {
        "algorithm": config.algorithm.name,
        "dataset": dataset_name(config.data.dataset),
        "ways": config.data.ways,
        "shots": config.data.shots,
        "git_commit": commit,
        "git_uncommitted": edited,
    }


def dataset_name(dataset: str) -> str:
    """``omniglot`` for ``data/omniglot`` and for ``s3://bucket/omniglot?region=...``."""
    from metadist.data.location import is_uri

    return Path(urlsplit(dataset).path if is_uri(dataset) else dataset).name


def plot_curves(history: list[dict[str, float]], path: Path, title: str = "") -> Path | None:
    """Learning curves as a PNG: training loss, training and validation accuracy (or MSE)."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(steps, [h["train_loss"] for h in history], lw=0.8, label="meta-train loss")
    axes[0].set_xlabel("meta-step")
    axes[0].set_yscale("log")
    axes[0].legend()
    for key, label in (("train_accuracy", "meta-train query accuracy"),
                       ("val_accuracy", "validation accuracy"), ("val_mse", "validation MSE")):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            xs, ys = zip(*points)
            axes[1].plot(xs, ys, marker="o" if key.startswith("val") else None, lw=0.8,
                         ms=3, label=label)
    axes[1].set_xlabel("meta-step")
    axes[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_learned_rates(history: list[dict[str, float]], path: Path,
                       title: str = "") -> Path | None:
    """Meta-SGD's mean learned inner rate of each parameter over the meta-steps (the
    ``inner_lr/NAME`` entries of the history); None when the run learned none."""
    keys = sorted({k for h in history for k in h if k.startswith("inner_lr/")})
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        points = [(h["step"], h[key]) for h in history if key in h]
        ax.plot(*zip(*points), lw=0.8, label=key.removeprefix("inner_lr/"))
    ax.set_xlabel("meta-step")
    ax.set_ylabel("mean learned inner rate")
    ax.legend(fontsize=6, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


PACKAGE_DIR = Path(__file__).resolve().parent


def git_commit(where: Path = PACKAGE_DIR) -> str:
    return _git(where, "rev-parse", "HEAD").strip() or "unknown"


def git_uncommitted(where: Path = PACKAGE_DIR) -> list[str]:
    """metadist's own files and configs that differ from ``git_commit()``: a run made from
    an edited tree is not that commit's run, and only this says so afterwards."""
    out = _git(where, "status", "--porcelain", "--untracked-files=no", "--", ":/metadist",
               ":/configs")
    return [line[3:] for line in out.splitlines() if line.strip()]


def _git(where: Path, *args: str) -> str:
    # The package's own checkout, wherever the command runs from; empty when installed
    # from a wheel or when git is missing.
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                             cwd=where)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout if out.returncode == 0 else ""


# -- a served model's checkpoint --------------------------------------------------------

MODEL_URI_PREFIXES = ("models:/", "runs:/")
CHECKPOINT_ARTIFACT = "checkpoint"  # serving.mlflow_model's artifact key (ARTIFACT there)


def download_model_checkpoint(model_uri: str, dst_dir: str | Path | None = None) -> Path:
    """The checkpoint file inside an MLflow model that ``serving.mlflow_model.log_learner``
    logged (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``runs:/RUN_ID/model``),
    downloaded from ``$MLFLOW_TRACKING_URI`` (else ./mlflow.db) into ``dst_dir`` (default:
    a new temporary directory, the caller's to remove). Only the model's MLmodel file and
    the checkpoint are fetched, not the code logged beside them."""
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    uri = resolve_tracking_uri()
    check_reachable(uri)
    base = model_uri.rstrip("/")
    dst = Path(dst_dir) if dst_dir is not None else Path(
        tempfile.mkdtemp(prefix="metadist-model-"))
    try:
        with first_use_lock(uri):
            mlmodel = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{base}/MLmodel", dst_path=str(dst), tracking_uri=uri)
        artifacts = Model.load(mlmodel).flavors.get("python_function", {}).get("artifacts")
        entry = (artifacts or {}).get(CHECKPOINT_ARTIFACT)
        if not entry:
            raise TrackingError(
                f"{model_uri}: not a metadist few-shot model (its MLmodel has no "
                f"{CHECKPOINT_ARTIFACT!r} pyfunc artifact; serving.mlflow_model.log_learner "
                "logs models that do)")
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{base}/{entry['path']}", dst_path=str(dst), tracking_uri=uri)
    except MlflowException as err:
        raise TrackingError(f"MLflow model {model_uri} (tracking store {redact(uri)}): "
                            f"{err.message}") from None
    except OSError as err:
        raise TrackingError(f"MLflow model {model_uri} (tracking store {redact(uri)}): "
                            f"{err}") from None
    return Path(path)
