"""``metadist cluster up --local``: a real multi-node Ray cluster on this machine, bound to
127.0.0.1, that ``cluster down`` stops exactly; and a run spread over two of its nodes
that survives the loss of one of them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import local_ray_cluster

from metadist.cli import main
from metadist.launch import cluster as local_cluster
from metadist.launch.jobs import Jobs, read_token
from metadist.training.checkpoint import load_checkpoint

SINUSOID = "configs/sinusoid_maml.yaml"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the local cluster tracks its processes in /proc")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head (no CPUs) and three 1-CPU worker nodes: a 2-worker run spans two of them and
    still fits on the two that are left when one is lost."""
    t0 = time.time()
    with local_ray_cluster(tmp_path_factory.mktemp("cluster") / "local-cluster.json", 3) as c:
        print(f"cluster up in {time.time() - t0:.0f} s")
        yield c


def test_up_starts_a_head_and_worker_nodes_listening_on_loopback_only(cluster):
    nodes = ray_nodes(cluster)
    assert len(nodes) == 4 and all(n["state"] == "ALIVE" for n in nodes)
    assert {n["node_ip"] for n in nodes} == {"127.0.0.1"}
    head = [n for n in nodes if n["is_head_node"]]
    assert len(head) == 1 and head[0]["resources_total"].get("CPU", 0) == 0
    for i in (1, 2, 3):  # each worker node with its own CPU and a resource naming it
        (node,) = [n for n in nodes if f"worker-{i}" in n["resources_total"]]
        assert node["resources_total"]["CPU"] == 1
    # Every listening socket of every process the cluster started is on 127.0.0.1:
    # GCS, raylets, object managers, agents, dashboard and job server, metrics.
    pids = local_cluster.session_processes([n.session for n in cluster.nodes])
    listening = listening_sockets(pids)
    assert {name for name, _ in listening} >= {"gcs_server", "raylet"}
    assert sum(name == "raylet" for name, _ in listening) >= 4
    assert {host for _, host in listening} == {"127.0.0.1"}, listening


def test_up_refuses_to_start_over_a_running_cluster(cluster):
    with pytest.raises(local_cluster.ClusterError, match="is running"):
        local_cluster.up(nodes=1, state=os.environ[local_cluster.STATE_ENV],
                         log=lambda *a: None)
    assert main(["cluster", "status"]) == 0


@pytest.mark.slow
def test_a_run_on_two_nodes_survives_losing_one(cluster, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = tmp_path / "runs"
    steps, every = 600, 100
    t0 = time.time()
    assert main([
        "submit", SINUSOID, "workers=2", "ray.max_failures=1", f"train.steps={steps}",
        f"train.checkpoint_every={every}", "train.val_every=0", "train.log_every=50",
        "eval.episodes=50", "train.progress=false", "train.inner_loop=loop",
        "algorithm.outer_optimizer=sgd", "algorithm.outer_lr=0.01", "train.threads=1",
        f"train.output_dir={runs}", "--mlflow-uri", uri, "--no-follow",
    ]) == 0
    jobs = Jobs()
    (job,) = [j.submission_id for j in jobs.list() if str(runs) in j.entrypoint]
    deadline = time.time() + 300
    while time.time() < deadline and not jobs.status(job).is_terminal():
        pids = {r: list(runs.glob(f"*/workers/rank-{r}.pid")) for r in (0, 1)}
        # Kill once a checkpoint after the first is on disk and registered with Ray: the
        # restart must resume from a checkpoint, not from step 0.
        if (pids[0] and pids[1] and list(runs.glob(f"*/checkpoints/step-{2 * every:07d}.pt"))
                and list(runs.glob("ray/*/checkpoint_*/checkpoint.pt"))):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the run ended or never checkpointed: {jobs.logs(job)[-3000:]}")
    nodes = {r: cluster.node_of_pid(int(pids[r][0].read_text())) for r in (0, 1)}
    assert nodes[0] is not None and nodes[1] is not None
    assert nodes[0].name != nodes[1].name  # the run spans two nodes
    assert nodes[1].name.startswith("worker-")
    os.kill(nodes[1].raylet_pid, signal.SIGKILL)  # the node is gone
    t_kill = time.time()
    status = jobs.follow(job, out=open(os.devnull, "w"))
    print(f"node lost at {t_kill - t0:.0f} s; job {status} at {time.time() - t0:.0f} s")
    assert status == "SUCCEEDED", jobs.logs(job)[-5000:]

    (result_file,) = runs.glob("*/result.json")
    result = json.loads(result_file.read_text())
    assert result["resumed_from_step"] >= every  # the restart resumed from a checkpoint
    history = load_checkpoint(result["checkpoint"])["history"]
    assert [h["step"] for h in history] == list(range(1, steps + 1))  # each step once
    (run,) = mlflow.MlflowClient(tracking_uri=uri).search_runs(
        [mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name("metadist")
         .experiment_id])
    assert run.data.tags["restarts"] == "1"
    assert run.data.tags["restart_1_from_step"] == str(result["resumed_from_step"])
    assert run.data.metrics["test_mse"] == pytest.approx(result["mean"])
    assert run.info.status == "FINISHED"


def test_down_stops_exactly_what_up_started(cluster, tmp_path):
    # A process that `ray stop` would take for Ray's (it kills by name) and must survive.
    fake = tmp_path / "raylet"
    shutil.copy(shutil.which("sleep"), fake)
    bystander = subprocess.Popen([str(fake), "600"])
    try:
        started = local_cluster.session_processes([n.session for n in cluster.nodes])
        assert len(started) > 10
        t0 = time.time()
        assert main(["cluster", "down"]) == 0
        print(f"cluster down in {time.time() - t0:.0f} s")
        assert [p for p in started if local_cluster.read_proc(p) is not None] == []
        assert bystander.poll() is None
        assert not Path(cluster.temp_dir).exists()
        assert not Path(os.environ[local_cluster.STATE_ENV]).exists()
        assert main(["cluster", "down"]) == 2  # nothing recorded any more: says so
    finally:
        bystander.kill()
        bystander.wait()


# --- helpers -------------------------------------------------------------------------


def ray_nodes(cluster) -> list[dict]:
    """Ray's own view of the nodes, through the dashboard's state API (with the token)."""
    token, _ = read_token()
    req = urllib.request.Request(f"{cluster.dashboard_url}/api/v0/nodes?limit=100",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)["data"]["result"]["result"]


def listening_sockets(pids: list[int]) -> list[tuple[str, str]]:
    """(process name, local address) of the TCP sockets these processes listen on."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        for pid in pids:
            if f"pid={pid}," in line:
                host = line.split()[3].rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")
                found.append((line.split('(("', 1)[1].split('"', 1)[0], host))
    return found
