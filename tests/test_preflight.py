"""The driver's checks before a Ray run starts workers: resources the cluster can never
give and a dataset that is not there are errors that say so; and what `metadist submit`
sends (no cluster needed here; tests/test_jobs.py sees the same errors come back from a
real cluster)."""

from __future__ import annotations

import pytest

from metadist.config import load_config
from metadist.launch.jobs import ROOT, job_arguments, pinned_requirements, runtime_env
from metadist.runners.preflight import check_dataset, check_resources

HEAD = {"CPU": 0.0, "memory": 1e9}


def cfg(*overrides: str):
    return load_config(ROOT / "configs" / "sinusoid_maml.yaml", list(overrides))


def nodes(*cpus: float, gpus: float = 0.0) -> list[dict[str, float]]:
    return [HEAD] + [{"CPU": c, "GPU": gpus} if gpus else {"CPU": c} for c in cpus]


def test_a_run_that_fits_passes():
    check_resources(cfg("workers=2"), nodes(1, 1))
    check_resources(cfg("workers=4", "ray.cpus_per_worker=0.5"), nodes(1, 1))
    check_resources(cfg("workers=2", "ray.use_gpu=true"), nodes(4, 4, gpus=1))


@pytest.mark.parametrize("overrides, cluster, message", [
    (["workers=64"], nodes(1, 1), "workers=64 need 64 x {CPU 1}, but the nodes hold at most 2"),
    # 3 CPUs in all, but a 2-CPU worker fits on no node
    (["workers=1", "ray.cpus_per_worker=2"], nodes(1.5, 1.5),
     "a worker needs {CPU 2} (ray.cpus_per_worker=2, ray.use_gpu=False) on one node"),
    (["workers=2", "ray.use_gpu=true"], nodes(8, 8),
     "a worker needs {CPU 1, GPU 1} (ray.cpus_per_worker=1, ray.use_gpu=True) on one node, "
     "but no node has that: the largest has CPU 8, GPU 0"),
    (["workers=3", "ray.use_gpu=true"], nodes(8, 8, gpus=1), "hold at most 2 such workers"),
    # bundles are indivisible: 4.5 CPUs in all, room for 3 one-CPU workers
    (["workers=4"], nodes(1.5, 1.5, 1.5), "hold at most 3 such workers"),
])
def test_a_run_that_can_never_fit_names_what_is_missing(overrides, cluster, message):
    with pytest.raises(ValueError) as err:
        check_resources(cfg(*overrides), cluster)
    assert message in str(err.value)
    assert f"the cluster has {len(cluster)} nodes" in str(err.value)


def test_episode_actors_count_towards_the_cpus(omniglot_small):
    config = cfg("workers=2", f"data.dataset={omniglot_small}", "ray.actors=2",
                 "ray.actor_cpus=0.5")
    check_resources(config, nodes(2, 2))  # 2 x (1 + 2 x 0.5) = 4 CPUs
    with pytest.raises(ValueError, match=r"plus 2 CPU of episode actors .* = CPU 4"):
        check_resources(config, nodes(1.5, 1.5))
    check_resources(cfg("workers=2"), nodes(1, 1))  # sinusoid: no actors


def test_the_check_can_be_turned_off_for_an_autoscaling_cluster(monkeypatch):
    monkeypatch.setenv("METADIST_SKIP_RESOURCE_CHECK", "1")
    check_resources(cfg("workers=64"), nodes(1))


def test_a_missing_dataset_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.dataset=.*nope: no such dataset"):
        check_dataset(cfg(f"data.dataset={tmp_path / 'nope'}"))
    check_dataset(cfg())  # sinusoid needs no files


def test_a_job_runs_the_checked_config_with_paths_made_absolute_on_the_local_cluster(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)
    argv, config = job_arguments(str(ROOT / "configs/sinusoid_maml.yaml"),
                                 ["workers=2", "train.output_dir=out"], local=True)
    assert argv == ["train", "configs/sinusoid_maml.yaml", "workers=2",
                    "train.output_dir=out", f"train.output_dir={tmp_path.parent / 'out'}"]
    assert config.workers == 2
    remote, _ = job_arguments(str(ROOT / "configs/sinusoid_maml.yaml"),
                              ["train.output_dir=out"], command="tune")
    assert remote == ["tune", "configs/sinusoid_maml.yaml", "train.output_dir=out"]
    outside = tmp_path / "mine.yaml"
    outside.write_text("name: mine\n")
    with pytest.raises(Exception, match="outside .*put it under configs/"):
        job_arguments(str(outside), [])


def test_the_runtime_environment_ships_the_code_not_the_data():
    from ray._private.runtime_env.packaging import _get_excludes

    env = runtime_env(env_vars={"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"})
    excluded = _get_excludes(ROOT, env["excludes"])  # how Ray applies them
    for path in (".venv", "data/omniglot", "runs", "mlflow.db", ".git", "metadist/__pycache__"):
        assert excluded(ROOT / path), path
    for path in ("metadist/training/streams.py", "metadist/cli.py", "configs/sinusoid_maml.yaml"):
        assert not excluded(ROOT / path), path
    assert env["env_vars"]["OMP_NUM_THREADS"] == "1" and "pip" not in env
    pins = pinned_requirements()
    assert any(p.startswith("torch==") for p in pins)
    assert any(p.startswith("ray[default,train,tune]==") for p in pins)
    assert all("==" in p and "<" not in p for p in pins)


def test_submit_takes_options_among_the_overrides():
    from metadist.cli import build_parser

    args = build_parser().parse_args(["submit", "configs/sinusoid_maml.yaml", "--address",
                                      "http://127.0.0.1:8265", "workers=2", "--no-follow",
                                      "train.steps=5"])
    assert args.config == "configs/sinusoid_maml.yaml" and args.no_follow
    assert args.address == "http://127.0.0.1:8265"
    assert args.overrides == ["workers=2", "train.steps=5"]
