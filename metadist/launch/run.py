"""``metadist train``: one run, tracked as one MLflow run, in this process or on Ray Train.

``workers > 1`` (or ``ray.enabled=true``) starts Ray Train workers (``metadist.runners.
ray_train``); otherwise the loop runs here. Either way the MLflow run is opened here, in
the driver, before any compute: an unreachable store fails the command at once.
"""

from __future__ import annotations

from typing import Any

from metadist.config import Config, uses_ray
from metadist.tracking import tracked_run
from metadist.training.loop import train


def tracked_training(config: Config, tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Train and meta-test ``config``; the result names its MLflow run when tracked."""
    with tracked_run(config, tags=tags) as tracker:
        result = run_training(config, tracker)
        if tracker is not None:
            result["mlflow_run_id"] = tracker.run_id
            result["mlflow_tracking_uri"] = tracker.uri
    return result


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
