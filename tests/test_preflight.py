"""The driver's checks before a Ray run starts workers: resources the cluster can never
give and a dataset that is not there are errors that say so; and what `metadist submit`
sends (no cluster needed here; tests/test_jobs.py sees the same errors come back from a
real cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest

from metadist.config import load_config
from metadist.launch.jobs import (
    PACKAGE,
    job_arguments,
    pinned_requirements,
    runtime_env,
    source_tags,
)
from metadist.runners.preflight import (
    PROCESS_MEMORY_FLOOR,
    check_dataset,
    check_memory,
    check_resources,
)

ROOT = Path(__file__).resolve().parents[1]
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


def test_more_processes_than_the_memory_holds_at_their_floor_are_refused(omniglot_small):
    gib = 2**30
    machine = [{"CPU": 65.0, "memory": 16 * gib}]  # the local Ray gets CPUs for any count
    check_memory(cfg("workers=4"), machine)
    with pytest.raises(ValueError) as err:
        check_memory(cfg("workers=64"), machine)
    assert str(err.value).startswith("workers=64 need at least 28.8 GiB")
    assert "offer 16.0 GiB in all" in str(err.value) and "at most workers=35" in str(err.value)
    # each worker's episode actors count too
    images = cfg("workers=8", f"data.dataset={omniglot_small}", "ray.actors=2")
    with pytest.raises(ValueError, match=r"workers=8 and their 16 episode actors \(ray.actors=2 "
                       r"each\) need at least 10.8 GiB.* at most workers=4 could start"):
        check_memory(images, [{"CPU": 65.0, "memory": 6 * gib}])
    check_memory(cfg("workers=64"), nodes(64))  # nodes that do not say: not checked
    assert 0.4 * gib <= PROCESS_MEMORY_FLOOR <= 0.5 * gib


def test_ray_s_oom_killer_is_recognised_in_a_failed_run():
    from ray.exceptions import OutOfMemoryError
    from ray.train import ControllerError, WorkerGroupError

    from metadist.runners.ray_train import out_of_memory

    oom = OutOfMemoryError("6 worker(s) were killed due to the node running low on memory")
    assert out_of_memory(ControllerError(oom))
    assert out_of_memory(WorkerGroupError("failed", {0: RuntimeError("x"), 1: oom}))
    try:
        raise RuntimeError("wrapped") from oom
    except RuntimeError as chained:
        assert out_of_memory(chained)
    assert not out_of_memory(ControllerError(RuntimeError("no")))
    assert not out_of_memory(WorkerGroupError("failed", {0: ValueError("nan")}))


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
                                 ["workers=2", "train.output_dir=out"], local=True, root=ROOT)
    assert argv == ["train", "configs/sinusoid_maml.yaml", "workers=2",
                    "train.output_dir=out", f"train.output_dir={tmp_path.parent / 'out'}"]
    assert config.workers == 2
    remote, _ = job_arguments(str(ROOT / "configs/sinusoid_maml.yaml"),
                              ["train.output_dir=out"], command="tune", root=ROOT)
    assert remote == ["tune", "configs/sinusoid_maml.yaml", "train.output_dir=out"]
    outside = tmp_path / "mine.yaml"
    outside.write_text((ROOT / "configs/sinusoid_maml.yaml").read_text())
    with pytest.raises(Exception, match=f"config {outside} is outside {ROOT}, .*--working-dir"):
        job_arguments(str(outside), [], root=ROOT)
    monkeypatch.chdir(tmp_path)  # the default: the directory the user stands in
    assert job_arguments("mine.yaml", [])[0] == ["train", "mine.yaml"]


def test_the_runtime_environment_ships_the_code_not_the_data():
    from ray._private.runtime_env.packaging import _get_excludes

    env = runtime_env(env_vars={"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}, root=ROOT)
    assert env["working_dir"] == str(ROOT) and "py_modules" not in env  # the checkout has it
    excluded = _get_excludes(ROOT, env["excludes"])  # how Ray applies them
    for path in (".venv", "data/omniglot", "runs", "mlflow.db", ".git", "metadist/__pycache__"):
        assert excluded(ROOT / path), path
    for path in ("metadist/training/streams.py", "metadist/cli.py", "configs/sinusoid_maml.yaml"):
        assert not excluded(ROOT / path), path
    assert env["env_vars"]["OMP_NUM_THREADS"] == "1" and "pip" not in env
    pins = pinned_requirements()
    assert any(p.startswith("torch==") for p in pins)
    ray = [p for p in pins if p.startswith("ray[")]  # the extras a job's workers import
    assert len(ray) == 1 and {"default", "train", "tune", "serve"} <= set(
        ray[0].split("[")[1].split("]")[0].split(",")), pins
    assert all("==" in p and "<" not in p for p in pins)


def test_submit_takes_options_among_the_overrides():
    from metadist.cli import build_parser

    args = build_parser().parse_args(["submit", "configs/sinusoid_maml.yaml", "--address",
                                      "http://127.0.0.1:8265", "workers=2", "--no-follow",
                                      "train.steps=5"])
    assert args.config == "configs/sinusoid_maml.yaml" and args.no_follow
    assert args.address == "http://127.0.0.1:8265"
    assert args.overrides == ["workers=2", "train.steps=5"]


@pytest.mark.parametrize("argv,option", [
    (["train", "c.yaml", "--resume", "ck.pt"], ("resume", "ck.pt")),
    (["pretrain", "c.yaml", "--resume", "ck.pt"], ("resume", "ck.pt")),
    (["tune", "c.yaml", "--resume"], ("resume", True)),
    (["reproduce", "omniglot", "--rows", "r1", "--budget", "full"], ("rows", "r1")),
])
def test_every_command_with_overrides_takes_them_before_or_after_its_options(argv, option):
    from metadist.cli import build_parser

    for args in (argv[:2] + ["a.b=1"] + argv[2:] + ["c.d=2"], argv + ["a.b=1", "c.d=2"]):
        parsed = build_parser().parse_args(args)
        assert parsed.overrides == ["a.b=1", "c.d=2"], args
        assert getattr(parsed, option[0]) == option[1], args


def test_a_project_is_shipped_with_this_metadist_beside_it_and_not_its_data(tmp_path):
    from ray._private.runtime_env.packaging import _get_excludes

    project = tmp_path / "project"
    for path in ("configs/mine.yaml", "data/omniglot/part-0.parquet", "data/ingest/raw.zip",
                 "data/[odd]*name", "runs/r/checkpoint.pt", "mymodels/backbone.py"):
        (project / path).parent.mkdir(parents=True, exist_ok=True)
        (project / path).write_text("x")
    env = runtime_env(env_vars={}, root=project)
    assert env["working_dir"] == str(project) and env["py_modules"] == [str(PACKAGE)]
    # Ray applies one exclude list to the working directory and to each module, each
    # relative to its own top.
    in_project = _get_excludes(project, env["excludes"])
    for path in ("data/omniglot", "data/[odd]*name", "runs"):
        assert in_project(project / path), path
    for path in ("configs/mine.yaml", "mymodels/backbone.py", "data"):
        assert not in_project(project / path), path
    # data/ingest is the name of a metadist subpackage too: the project's copy is shipped
    # rather than the package's dropped (the package's is the one that matters).
    in_package = _get_excludes(PACKAGE, env["excludes"])
    for path in ("data/episodes.py", "data/ingest/convert.py", "training/loop.py", "cli.py"):
        assert not in_package(PACKAGE / path), path
    assert in_package(PACKAGE / "__pycache__")


def test_a_job_records_the_commit_of_the_metadist_it_ships(monkeypatch):
    from metadist.tracking import git_commit, run_tags

    tags = source_tags()
    commit = git_commit(PACKAGE)
    if commit == "unknown":  # a copy without git history (a CI tarball)
        assert tags == {}
        return
    assert tags["METADIST_GIT_COMMIT"] == commit and tags["METADIST_GIT_UNCOMMITTED"]
    assert set(tags) <= set(runtime_env(env_vars={}, root=ROOT)["env_vars"])
    # In the job, the shipped copy has no history; the tags come from what submit sent.
    monkeypatch.setenv("METADIST_GIT_COMMIT", "abc123")
    monkeypatch.setenv("METADIST_GIT_UNCOMMITTED", "metadist/cli.py")
    recorded = run_tags(cfg())
    assert (recorded["git_commit"], recorded["git_uncommitted"]) == ("abc123", "metadist/cli.py")
