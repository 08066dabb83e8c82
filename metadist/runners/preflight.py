"""Checks a Ray run makes in its driver before it starts any worker, so that a run that
cannot work fails in seconds with a message instead of waiting for resources that will
never come (Ray queues an unsatisfiable request and waits) or failing inside a worker.

``METADIST_SKIP_RESOURCE_CHECK=1`` turns the resource check off, for an autoscaling
cluster whose nodes appear only once there is work for them.
"""

from __future__ import annotations

import math
import os
from typing import Any

from metadist.config import Config


def preflight(config: Config) -> None:
    """The checks; call after ``ray.init``."""
    check_dataset(config)
    nodes = alive_nodes()
    check_resources(config, nodes)
    check_memory(config, nodes)


def check_dataset(config: Config) -> None:
    """The dataset and its splits exist and are readable from here (the same messages as
    a single-process run: FileNotFoundError / ValueError naming the path)."""
    if config.data.dataset == "sinusoid":
        return
    from metadist.training.streams import open_streams

    open_streams(config.data, train_seed=config.train.seed, eval_seed=config.eval.seed)


def worker_bundle(config: Config) -> dict[str, float]:
    """What one Ray Train worker reserves (``ScalingConfig`` in ``metadist.runners.ray_train``)."""
    bundle = {"CPU": float(config.ray.cpus_per_worker)}
    if config.ray.use_gpu:
        bundle["GPU"] = 1.0
    return {k: v for k, v in bundle.items() if v > 0}


def run_cpus(config: Config) -> float:
    """Logical CPUs one run asks of Ray: its workers and their episode actors."""
    actors = config.ray.actors * config.ray.actor_cpus if config.data.dataset != "sinusoid" else 0
    return config.workers * (config.ray.cpus_per_worker + actors)


def check_resources(config: Config, nodes: list[dict[str, float]] | None = None) -> None:
    """Raise ValueError when the cluster can never hold the run: a worker larger than
    every node, more workers than the nodes can hold, or no room left for the episode
    actors. ``nodes``: the alive nodes' total resources (default: from Ray)."""
    if os.environ.get("METADIST_SKIP_RESOURCE_CHECK") == "1":
        return
    if nodes is None:
        nodes = alive_nodes()
    bundle = worker_bundle(config)
    actor_cpus = run_cpus(config) - config.workers * config.ray.cpus_per_worker
    totals = {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
    where = (f"the cluster has {len(nodes)} nodes with "
             + ", ".join(f"{k} {_fmt(v)}" for k, v in totals.items()) + " in all")
    asked = ", ".join(f"{k} {_fmt(v)}" for k, v in bundle.items())
    fits = [n for n in nodes if all(n.get(k, 0.0) >= v for k, v in bundle.items())]
    if not fits:
        largest = max(nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)),
                      default={})
        raise ValueError(
            f"a worker needs {{{asked}}} (ray.cpus_per_worker={_fmt(config.ray.cpus_per_worker)}"
            f", ray.use_gpu={config.ray.use_gpu}) on one node, but no node has that: the "
            f"largest has CPU {_fmt(largest.get('CPU', 0.0))}, GPU {_fmt(largest.get('GPU', 0.0))}"
            f"; {where}"
        )
    room = sum(min(math.floor(n.get(k, 0.0) / v + 1e-9) for k, v in bundle.items())
               for n in fits)
    if room < config.workers:
        raise ValueError(
            f"workers={config.workers} need {config.workers} x {{{asked}}}, but the nodes "
            f"hold at most {room} such workers; {where}"
        )
    cpus = run_cpus(config)
    if cpus > totals["CPU"] + 1e-9:
        raise ValueError(
            f"workers={config.workers} x CPU {_fmt(bundle.get('CPU', 0.0))} plus "
            f"{_fmt(actor_cpus)} CPU of episode actors (ray.actors={config.ray.actors} x "
            f"ray.actor_cpus={_fmt(config.ray.actor_cpus)} per worker) = CPU {_fmt(cpus)}; "
            f"{where}"
        )


# Private memory of the smallest process a run starts: a Ray Train worker (torch and Ray
# alone, with the sinusoid MLP) holds 463-465 MiB of its own on the development machine
# (benchmarks/worker_memory.py). A floor, so the check below never refuses a run that
# would fit; image workers and episode actors hold several times more.
PROCESS_MEMORY_FLOOR = 0.45 * 2**30


def check_memory(config: Config, nodes: list[dict[str, float]] | None = None) -> None:
    """Raise ValueError when the run's processes cannot fit in the nodes' memory even at
    their floor (Ray's ``memory`` resource, what is left beside the object store): the
    run would otherwise start them all and have Ray's OOM killer end it."""
    if os.environ.get("METADIST_SKIP_RESOURCE_CHECK") == "1":
        return
    if nodes is None:
        nodes = alive_nodes()
    if not nodes or any("memory" not in n for n in nodes):
        return
    actors = config.ray.actors if config.data.dataset != "sinusoid" else 0
    processes = config.workers * (1 + actors)
    need, have = processes * PROCESS_MEMORY_FLOOR, sum(n["memory"] for n in nodes)
    if need > have:
        most = int(have // (PROCESS_MEMORY_FLOOR * (1 + actors)))
        who = (f"workers={config.workers} and their {processes - config.workers} episode "
               f"actors (ray.actors={actors} each)" if actors else f"workers={config.workers}")
        raise ValueError(
            f"{who} need at least {need / 2**30:.1f} GiB, "
            f"{PROCESS_MEMORY_FLOOR / 2**30:.2f} GiB each for torch and Ray alone, but the "
            f"nodes offer {have / 2**30:.1f} GiB in all (Ray's memory resource): at most "
            f"workers={most} could start"
        )


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def _fmt(x: float) -> str:
    return f"{x:g}"
