"""Meta-training on Ray: Ray Train's ``TorchTrainer`` starts and supervises the workers
(process groups: NCCL on CUDA, gloo on CPU, met through ``metadist.runners.rendezvous``),
restarts them from the last reported checkpoint after a failure, and each worker's share
of every meta-batch streams in from a pool of episode actors
(``metadist.runners.pipeline``). The loop itself is ``metadist.training.loop``.

Ray Train's workers get no signal when the job is stopped or preempted: the driver does.
Its first SIGTERM is passed on through a small actor whose answer the workers check once
a step, so they end after the step in flight with a checkpoint, as a single process would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from metadist.config import Config, config_from_dict, to_dict, train_episode_shape
from metadist.data.location import Location
from metadist.runners.loopback import LOOPBACK, keep_ray_on_loopback
from metadist.runners.pipeline import EpisodePipeline
from metadist.runners.preflight import preflight, run_cpus
from metadist.runners.rendezvous import BoundRendezvous
from metadist.tracking import tracked_run
from metadist.training.checkpoint import load_checkpoint
from metadist.training.loop import Hooks, discard_unused_run, train
from metadist.training.pretrain import pretrain
from metadist.training.runtime import NonFiniteError
from metadist.training.signals import Stopped, sigterm_deferred
from metadist.training.streams import training_preprocessing

CHECKPOINT_FILE = "checkpoint.pt"
RECIPES = {"train": train, "pretrain": pretrain}  # the loop each worker runs


def init_ray(config: Config, need_cpus: float | None = None) -> None:
    """Attach to ``ray.address`` / ``$RAY_ADDRESS``, or start a local Ray that listens on
    loopback only (``metadist.runners.loopback``) with at least ``need_cpus`` logical CPUs
    (default: what one run of ``config`` asks)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # Logical CPUs for the workers and their light actors; more than the cores is fine,
    # the actors mostly wait.
    need = need_cpus if need_cpus is not None else run_cpus(config)
    keep_ray_on_loopback()
    ray.init(
        # "local": a new instance even when `ray start` left a cluster on this machine,
        # which ray.init() would otherwise join.
        address="local",
        num_cpus=max(os.cpu_count() or 1, int(need + 1.999)),
        _node_ip_address=LOOPBACK,
        # The dashboard serves the state API that Ray Train's controller polls; without
        # it the worker group's placement group is never cleaned up.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        log_to_driver=True,
    )


def train_on_ray(
    config: Config, *, mlflow_run_id: str | None = None, tracking_uri: str | None = None,
    run_dir: str | Path | None = None, callbacks: tuple = (), recipe: str = "train",
) -> dict[str, Any]:
    """``run_dir`` names the run: a second call with the same one (a Tune trial started
    again) continues from the run's last reported checkpoint. ``callbacks``: Ray Train
    callbacks (a Tune trial passes ``TuneReportCallback``). ``recipe``: ``train``
    (meta-training) or ``pretrain`` (supervised pre-training, ``metadist.training.
    pretrain``), the loop every worker runs."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe {recipe!r} is not one of {sorted(RECIPES)}")
    init_ray(config)
    preflight(config)  # impossible resources or a missing dataset: fail now
    out = Path(config.train.output_dir).resolve()
    owned = run_dir is None  # named here, so a failure here may remove it
    if run_dir is None:
        run_dir = out / f"{config.name}-{datetime.now():%Y%m%d-%H%M%S-%f}"
    run_dir = Path(run_dir).resolve()
    storage = Path(config.ray.storage_path).resolve() if config.ray.storage_path else out / "ray"
    # On the driver's node: a flag lost with another node would fail the workers' poll.
    stop_flag = StopFlag.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False)).remote()
    trainer = TorchTrainer(
        worker_loop,
        torch_config=BoundRendezvous(),
        train_loop_config={
            "config": to_dict(config),
            "run_dir": str(run_dir),
            "mlflow_run_id": mlflow_run_id,
            "tracking_uri": tracking_uri,
            "stop_flag": stop_flag,
            "recipe": recipe,
        },
        scaling_config=ScalingConfig(
            num_workers=config.workers,
            use_gpu=config.ray.use_gpu,
            resources_per_worker={"CPU": config.ray.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=run_dir.name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=config.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
        ),
    )
    try:
        return outcome_of(trainer, stop_flag, config, recipe)
    except BaseException:
        if owned:  # a failure before the first checkpoint leaves nothing worth keeping
            discard_unused_run(run_dir)
            discard_unused_run(storage / run_dir.name)
        raise


def outcome_of(trainer: TorchTrainer, stop_flag, config: Config, recipe: str = "train"
               ) -> dict[str, Any]:
    with sigterm_passed_on(stop_flag):
        result = trainer.fit()
    if result.error is not None:
        if out_of_memory(result.error):
            raise ValueError(
                f"the run's processes ran out of memory and Ray's OOM killer ended them "
                f"(workers={config.workers}, ray.actors={config.ray.actors} each, "
                f"algorithm.meta_batch_size={config.algorithm.meta_batch_size}); run fewer "
                "workers or episode actors, a smaller meta-batch, or on larger nodes") from None
        raise result.error
    outcome = result.return_value
    if "diverged" in outcome:
        raise NonFiniteError(outcome["diverged"])
    if "stopped_after_step" in outcome:
        step, path = outcome["stopped_after_step"], outcome["resume"]
        of = f" of {config.train.steps}" if recipe == "train" else ""
        print(f"SIGTERM: the workers stopped after step {step}{of}; "
              f"continue with resume={path} (on the rank-0 worker's node; Ray's storage "
              f"holds it too: {result.checkpoint.path if result.checkpoint else 'none'})",
              file=sys.stderr, flush=True)
        raise Stopped(step, path)
    return outcome


@ray.remote(num_cpus=0)
class StopFlag:
    """Set by the driver on SIGTERM. Each worker keeps one ``wait()`` call open, which
    returns when it is set: a worker learns of the stop in the step in flight, where a
    polled answer would be a step old (and the stop a step late, past the grace)."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()  # async methods: a waiting call never blocks set

    async def set(self) -> None:
        self.requested.set()

    async def wait(self) -> bool:
        await self.requested.wait()
        return True


@contextlib.contextmanager
def sigterm_passed_on(stop_flag):
    """The driver's first SIGTERM sets ``stop_flag`` (a second one unwinds at once). Off
    the main thread (a Tune trial) nothing is installed."""
    requested, finished = threading.Event(), threading.Event()

    # A signal handler must not call into Ray (it runs between two bytecodes of whatever
    # the main thread was doing inside Ray), so it only sets an event, and this thread calls.
    def pass_on() -> None:
        requested.wait()
        if not finished.is_set():
            stop_flag.set.remote()

    thread = threading.Thread(target=pass_on, daemon=True, name="metadist-sigterm")
    thread.start()
    try:
        with sigterm_deferred(on_request=requested.set):
            yield
    finally:
        finished.set()
        requested.set()
        thread.join()


class StopPoll:
    """``train``'s ``stop``: whether the driver asked to stop, without waiting on Ray in
    the step (the open ``wait()`` call has returned or not)."""

    def __init__(self, stop_flag) -> None:
        self.answer = stop_flag.wait.remote()

    def __call__(self) -> bool:
        ready, _ = ray.wait([self.answer], timeout=0)
        return bool(ready) and ray.get(self.answer)  # an error (the flag lost) raises


def worker_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    """``train_loop_per_worker``: the same loop as a single process, fed by the actors."""
    cfg = config_from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg.train.threads = cfg.train.threads or max(1, int(cfg.ray.cpus_per_worker))
    # Which process is which rank: for operators (and the failure tests) to find a worker.
    pid_dir = Path(loop_config["run_dir"]) / "workers"
    pid_dir.mkdir(parents=True, exist_ok=True)
    (pid_dir / f"rank-{rank}.pid").write_text(str(os.getpid()))
    if cfg.ray.use_gpu:
        cfg.train.device = str(ray.train.torch.get_device())

    resume = cfg.resume
    restored = ray.train.get_checkpoint()  # set when Ray restarts the group after a failure
    if restored is not None:
        resume = local_copy(restored, loop_config["run_dir"])
    start = int(load_checkpoint(resume)["step"]) if resume else 0

    recipe = loop_config.get("recipe", "train")
    batches, pipeline = None, None  # pre-training reads its images in the worker
    if recipe == "train" and cfg.data.dataset != "sinusoid" and cfg.ray.actors > 0:
        pipeline = open_pipeline(cfg, start_step=start, rank=rank, world_size=world)
        batches = pipeline.get

    try:
        with tracked_run(cfg, when=rank == 0 and bool(loop_config.get("mlflow_run_id")),
                         tracking_uri=loop_config["tracking_uri"],
                         run_id=loop_config["mlflow_run_id"]) as tracker:
            if tracker is not None and restored is not None:
                tracker.note_restart(start)
            # Every worker reports; rank 0 hands Ray the checkpoint a restart resumes from.
            hooks = Hooks(batches=batches, report=reporter(ray.train.report),
                          stop=StopPoll(loop_config["stop_flag"]))
            result = RECIPES[recipe](cfg, tracker, resume, run_dir=loop_config["run_dir"],
                                     hooks=hooks)
        if pipeline is not None:
            result["pipeline"] = {
                k: v for k, v in pipeline.stats().items() if isinstance(v, int | float)
            }
    except Stopped as stopped:
        # Returned, not raised: Ray Train would take an exception for a failure and start
        # the workers again. The driver turns it back into the exit.
        return {"stopped_after_step": stopped.step, "resume": stopped.checkpoint}
    except NonFiniteError as err:
        # Returned too: a restart from the last checkpoint would diverge again.
        return {"diverged": str(err)}
    finally:
        if pipeline is not None:
            pipeline.close()
    return result


def reporter(report_fn, checkpoint_cls=Checkpoint):
    """``train``'s report hook for ``ray.train.report`` (or ``ray.tune.report`` with
    ``ray.tune.Checkpoint``): metrics at every validation and checkpoint, with the
    checkpoint on rank 0."""

    def report(metrics: dict[str, float], path: Path | None) -> None:
        if path is None:
            report_fn(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            shutil.copy(path, Path(d) / CHECKPOINT_FILE)
            report_fn(metrics, checkpoint=checkpoint_cls.from_directory(d))

    return report


def out_of_memory(error: BaseException) -> bool:
    """Whether a Ray Train failure is Ray's OOM killer at work, anywhere in its chain."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ray.exceptions.OutOfMemoryError):
            return True
        failures = getattr(error, "worker_failures", None) or {}
        if any(out_of_memory(e) for e in failures.values()):
            return True
        error = (getattr(error, "controller_failure", None) or error.__cause__
                 or error.__context__)
    return False


def local_copy(checkpoint: Checkpoint, into: str | Path) -> str:
    """A reported Ray checkpoint as a local ``.pt`` file that ``resume`` can take, at
    ``into/restored.pt`` (the run's own directory: a copy in the temp folder would outlive
    the run and never be cleaned up). A later restore overwrites it."""
    target = Path(into) / "restored.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")  # the ranks on a node copy at once
    with checkpoint.as_directory() as d:
        shutil.copy(Path(d) / CHECKPOINT_FILE, tmp)
    os.replace(tmp, target)
    return str(target)


def open_pipeline(cfg: Config, *, start_step: int, rank: int, world_size: int):
    # A local path or a URI (s3://bucket/omniglot): pathlib would turn s3:// into s3:/.
    split_dir = Location.of(cfg.data.dataset) / cfg.data.train_split
    ways, shots, queries = train_episode_shape(cfg.data)
    return EpisodePipeline(
        split_dir, ways=ways, shots=shots, queries=queries,
        seed=cfg.train.seed, preprocessing=training_preprocessing(cfg.data),
        meta_batch_size=cfg.algorithm.meta_batch_size, num_actors=cfg.ray.actors,
        actor_cpus=cfg.ray.actor_cpus, prefetch=cfg.ray.prefetch, start_step=start_step,
        rank=rank, world_size=world_size, decode_cache=cfg.data.decode_cache,
        decode_cache_max_gb=cfg.data.decode_cache_max_gb,
    )
