"""``metadist train`` and ``metadist pretrain``: one run, tracked as one MLflow run, in
this process or on Ray Train.

``workers > 1`` (or ``ray.enabled=true``) starts Ray Train workers (``metadist.runners.
ray_train``); otherwise the loop runs here. Either way the MLflow run is opened here, in
the driver, before any compute: an unreachable store fails the command at once. With
``tracking.register_model`` a run that finished registers its model in the Model Registry
(``serving.mlflow_model``).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from metadist.config import Config, check_pretraining, uses_ray
from metadist.tracking import tracked_run
from metadist.training.loop import train
from metadist.training.pretrain import pretrain


def tracked_training(config: Config, tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Train and meta-test ``config``; the result names its MLflow run when tracked."""
    with tracked_run(config, tags=tags) as tracker:
        result = run_training(config, tracker)
        if tracker is not None:
            result["mlflow_run_id"] = tracker.run_id
            result["mlflow_tracking_uri"] = tracker.uri
            if config.tracking.register_model:
                result["registered_model"] = register_trained(
                    result, config.tracking.register_model)
    return result


def register_trained(result: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The run's final model as an MLflow pyfunc model of its (active) run, registered as
    ``name``. Reached only by a run that finished: a diverged, failed or stopped one raised
    before. A non-finite final score is refused all the same, with a word."""
    if not math.isfinite(result["mean"]):
        print(f"metadist: not registering {name!r}: the final {result['metric']} is "
              f"{result['mean']}", file=sys.stderr, flush=True)
        return None
    from metadist.serving.mlflow_model import log_learner

    checkpoint = result["checkpoint"]
    if not Path(checkpoint).is_file():  # rank 0 ran on another node: the run's own copy
        checkpoint = f"runs:/{result['mlflow_run_id']}/checkpoints/final.pt"
    return log_learner(checkpoint, name)


def run_training(config: Config, tracker) -> dict[str, Any]:
    if not uses_ray(config):
        return train(config, tracker)
    # Imported here: a single-process run does not pay for importing Ray.
    from metadist.runners.ray_train import train_on_ray

    return train_on_ray(
        config,
        mlflow_run_id=tracker.run_id if tracker is not None else None,
        tracking_uri=tracker.uri if tracker is not None else None,
    )


def tracked_pretraining(config: Config, tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Pre-train ``config`` (its ``pretrain`` section) and meta-test the backbone with its
    few-shot head; the result names its MLflow run (tagged ``stage=pretrain``) when
    tracked."""
    check_pretraining(config)  # before the MLflow run opens
    # The workers read their images themselves: no episode actors to reserve CPUs for.
    config.ray.actors = 0
    with tracked_run(config, tags={"stage": "pretrain", **(tags or {})}) as tracker:
        if not uses_ray(config):
            result = pretrain(config, tracker)
        else:
            from metadist.runners.ray_train import train_on_ray

            result = train_on_ray(
                config, mlflow_run_id=tracker.run_id if tracker is not None else None,
                tracking_uri=tracker.uri if tracker is not None else None, recipe="pretrain",
            )
        if tracker is not None:
            result["mlflow_run_id"] = tracker.run_id
            result["mlflow_tracking_uri"] = tracker.uri
    return result
