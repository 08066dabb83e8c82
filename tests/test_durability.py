"""What a run leaves in MLflow outlives the cluster it ran on: a sweep submitted to the
local cluster, on a fresh local store, keeps its checkpoints and registered model after
`metadist cluster down` deletes the cluster's temp folder (the jobs' working directories)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import local_ray_cluster

from metadist.cli import main

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the local cluster tracks its processes in /proc")


def test_a_submitted_sweep_s_artifacts_and_model_outlive_the_cluster(tmp_path, capsys):
    # On a fresh local store, the job creates the experiment. Its artifacts (checkpoints,
    # plots, the registered model) must not land in the job's working directory, which
    # `cluster down` deletes with the cluster's temp folder.
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    with local_ray_cluster(tmp_path / "local-cluster.json", 1) as c:
        rc = main(["submit", "configs/tune_sinusoid_maml.yaml", "--tune", "train.steps=20",
                   "train.val_every=10", "train.checkpoint_every=10", "train.val_episodes=5",
                   "eval.episodes=5", "train.progress=false", "tune.num_samples=2",
                   "tune.max_concurrent=1", "tune.scheduler=none",
                   "tracking.experiment=durable", "tune.model_name=durable-model",
                   f"train.output_dir={tmp_path / 'out'}", "--mlflow-uri", uri])
        out, err = capsys.readouterr()
        assert rc == 0, (out + err)[-4000:]
        temp_dir = Path(c.temp_dir)
    assert not temp_dir.exists()  # the cluster and its jobs' working directories are gone
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("durable")
    assert experiment.artifact_location == (tmp_path / "store" / "mlartifacts" / "durable"
                                            ).as_uri()
    runs = client.search_runs([experiment.experiment_id])
    trial = next(r for r in runs if "mlflow.parentRunId" in r.data.tags)
    local = mlflow.artifacts.download_artifacts(run_id=trial.info.run_id,
                                                artifact_path="checkpoints",
                                                tracking_uri=uri, dst_path=str(tmp_path / "dl"))
    assert list(Path(local).glob("*.pt"))
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/durable-model/1")
    x = torch.linspace(-5, 5, 10)[:, None]
    [answer] = model.predict({"support": x.tolist(), "labels": torch.sin(x).ravel().tolist(),
                              "query": x.tolist()})
    assert torch.tensor(answer["predictions"]).shape == (10, 1)
