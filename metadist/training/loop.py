"""The meta-training recipe, top to bottom: set-up, data, model, optimiser, the loop
(meta-batch -> inner loops -> all-reduced meta-gradient -> outer step), validation,
checkpoints and the final meta-test.

The same function is the loop of every worker: one process, each rank under ``torchrun``,
or each Ray Train worker (``metadist.runners.ray_train``). When a process group is up,
worker r runs the inner loops of its slice of every meta-batch, the summed meta-gradients
are all-reduced, and every worker takes the same outer step. Every rank runs every line:
what only rank 0 does (files, tracking) is decided once, by the ``RunFiles`` and tracker
it is given. A runner plugs in through ``Hooks``; this module imports neither Ray nor
MLflow.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from metadist.algorithms import (
    TEMPERATURE_KEY,
    CarriedMoments,
    MetaStep,
    learned_rate_means,
    meta_gradient,
    multi_step_weights,
    with_learned_rates,
    with_step_norms,
    with_step_rates,
)
from metadist.config import Config, to_dict, to_yaml
from metadist.data.episodes import MetaBatch
from metadist.models import build_model, model_spec, second_order_under_vmap
from metadist.training.bookkeeping import Bookkeeping
from metadist.training.checkpoint import (
    load_trained,
    pretrained_backbone,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from metadist.training.distributed import (
    all_reduce_sum,
    broadcast_from_rank0,
    rank_and_world,
    shard_bounds,
)
from metadist.training.evaluate import evaluate_split
from metadist.training.memory import MemoryBudgetError, chunk_for_budget, peak_memory
from metadist.training.runtime import check_finite, resolve_device, seed_everything
from metadist.training.signals import sigterm_deferred
from metadist.training.streams import Streams, episode_batch, open_streams


class NullTracker:
    """Tracking that records nothing: the default outside the CLI, and on ranks > 0."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_result(self, result: dict[str, Any], history: list[dict[str, float]]) -> None: ...

    def log_stop(self, step: int, checkpoint: Path) -> None: ...


@dataclass
class Hooks:
    """What a runner plugs into the loop; the defaults are a plain process.

    ``batches(step)``: this worker's share of meta-batch ``step`` (the Ray episode
    pipeline); None reads it here. ``report(metrics, checkpoint)``: called on every worker
    at each step that validated or checkpointed (Ray Train's and Ray Tune's report; rank 0
    gets the checkpoint path, the others None). ``stop()``: polled once a step, true when a
    driver asks the workers to stop (a Ray Train driver's SIGTERM, passed on).
    """

    batches: Callable[[int], MetaBatch] | None = None
    report: Callable[[dict[str, float], Path | None], None] | None = None
    stop: Callable[[], bool] | None = None


def train(
    config: Config,
    tracker=None,
    resume: str | Path | None = None,
    *,
    run_dir: str | Path | None = None,
    hooks: Hooks | None = None,
) -> dict[str, Any]:
    """Meta-train, then meta-test (or, with ``train.final_test=false``, end on the
    validation split: a tuning trial must never see the test classes).

    A SIGTERM to this process, or ``hooks.stop()`` turning true, ends the loop after the
    step in flight with a checkpoint, reported like the periodic ones, and raises
    ``Stopped`` (exit status 143).
    """
    rank, world = rank_and_world()
    files = RunFiles(run_dir or Path(config.train.output_dir)
                     / f"{config.name}-{datetime.now():%Y%m%d-%H%M%S-%f}", writes=rank == 0)
    try:
        return _train(config, files, tracker if rank == 0 else None, resume or config.resume,
                      hooks or Hooks(), rank, world)
    except BaseException:
        if files.created:
            discard_unused_run(files.root)
        raise


def initial_params(cfg: Config, model, meta_step: MetaStep) -> dict[str, torch.Tensor]:
    """The parameters a run starts from (seeded by train.seed): the model's, its backbone
    from ``model.pretrained`` where set, and the learned rates and per-step batch norms
    its algorithm adds (per-step batch norms start from the pre-trained ones; a learned
    temperature from ``algorithm.temperature``)."""
    params = model.init_params(torch.Generator().manual_seed(cfg.train.seed))
    if cfg.model.pretrained:  # the backbone from a checkpoint; the head stays seeded
        params.update(pretrained_backbone(cfg.model.pretrained, model))
    if meta_step.algorithm == "metasgd":
        params = with_learned_rates(params, cfg.algorithm.inner_lr)
    if meta_step.learn_temperature:  # Meta-Baseline's scale, from algorithm.temperature
        params[TEMPERATURE_KEY] = torch.tensor(float(cfg.algorithm.temperature))
    norms = model.norm_keys if meta_step.per_step_bn else ()
    if meta_step.lslr:  # a rate for every parameter the inner loop adapts
        params = with_step_rates(params, cfg.algorithm.inner_lr, cfg.algorithm.inner_steps,
                                 [k for k in params if k not in norms])
    return with_step_norms(params, norms, cfg.algorithm.inner_steps)


def _train(cfg: Config, files: RunFiles, tracker, resume: str | Path | None, hooks: Hooks,
           rank: int, world: int) -> dict[str, Any]:
    tracker = tracker if tracker is not None else NullTracker()
    # -- set-up ---------------------------------------------------------------
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    files.write_config(cfg)

    # -- data, model, optimiser -----------------------------------------------
    streams = open_streams(cfg.data, train_seed=cfg.train.seed, eval_seed=cfg.eval.seed)
    model = build_model(cfg.model, ways=cfg.data.ways, in_channels=streams.in_channels,
                        image_size=streams.image_size)
    meta_step = MetaStep.from_config(cfg.algorithm)
    test_step = MetaStep.from_config(cfg.algorithm, test=True)
    # MAML++'s derivative-order annealing: the first meta-steps take the first-order one.
    early_step = replace(meta_step, first_order=True)
    params = initial_params(cfg, model, meta_step)
    params = {k: v.to(device).requires_grad_() for k, v in params.items()}
    broadcast_from_rank0(list(params.values()))
    optimizer = make_optimizer(cfg, list(params.values()))
    schedule = make_schedule(cfg, optimizer)
    # The inner Adam's state, when it runs on from task to task (algorithm.inner_state).
    carried = CarriedMoments() if meta_step.inner_state == "carried" else None
    start, history = 0, []
    if resume is not None:
        start, history = restore(resume, model, params, optimizer, schedule, carried)
    batch_size = cfg.algorithm.meta_batch_size
    lo, hi = shard_bounds(batch_size, rank, world)  # this worker's tasks of every meta-batch

    def batch_at(step: int) -> tuple[MetaBatch, torch.Tensor | None]:
        first = step * batch_size
        batch = (hooks.batches(step) if hooks.batches is not None
                 else episode_batch(streams.train, first + lo, first + hi))
        # Task i's inner minibatches follow (seed, i), as its episode does.
        order = meta_step.minibatches(batch.support_x.shape[1], cfg.train.seed,
                                      range(first + lo, first + hi), device)
        return MetaBatch(*(t.to(device) for t in batch)), order

    def autocast():
        # bf16 only: fp16 would need loss scaling through the inner loops' own gradients.
        return torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=cfg.train.precision == "bf16")

    # How the tasks run: the inner-loop path, and how many tasks at a time (a memory
    # budget measures what fits); both are measured on rank 0 and agreed by every worker.
    recompute = cfg.train.recompute_inner
    paths = ("loop", "vmap") if cfg.train.inner_loop == "auto" else (cfg.train.inner_loop,)
    if paths == ("loop", "vmap") and not meta_step.is_first_order \
            and not second_order_under_vmap(model):
        paths = ("loop",)  # no im2col layers to run second order under vmap on
    with autocast():
        chunks = {path: cfg.train.chunk for path in paths}
        if cfg.train.max_memory_gb is not None:
            chunks = agree_on_chunks(model, params, streams, meta_step, cfg, max(hi - lo, 1),
                                     device, paths)
        inner_loop = next(iter(chunks)) if len(chunks) == 1 else agree_on_inner_loop(
            model, params, streams, meta_step, cfg, max(hi - lo, 1), device, chunks)
    chunk = chunks[inner_loop]
    # Evaluation batches eval.batch_size episodes. Under vmap they would all run at once,
    # and at 84x84 the im2col buffers of 50 episodes took 22 GB (a run killed for memory);
    # a training step's tasks (with their backward) are known to fit, so vmap evaluates
    # that many episodes at a time.
    eval_chunk = chunk or (max(hi - lo, 1) if inner_loop == "vmap" else 0)

    def checkpoint(step: int, name: str) -> Path | None:
        return files.checkpoint(name, lambda: {
            "config": to_dict(cfg),
            "model": model_spec(model),
            "preprocessing": None if streams.preprocessing is None
            else vars(streams.preprocessing),
            "params": {k: v.detach().cpu() for k, v in params.items()},
            "optimizer": optimizer.state_dict(),
            "inner_moments": None if carried is None else carried.state_dict(),
            "step": step,
            "sampler": {"seed": cfg.train.seed, "next_episode": step * batch_size},
            "rng": rng_state(),
            "history": history,
        })

    def evaluate(source, episodes: int, split: str) -> dict[str, Any]:
        # Each worker scores its slice of the episodes; the sum fills in everyone's gaps.
        return evaluate_split(model, params, source, test_step, cfg, split, episodes,
                              inner_loop=inner_loop, chunk=eval_chunk, device=device,
                              carried=carried)

    # -- the loop ---------------------------------------------------------------
    bar = tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps,
               # A bar is for a terminal: in a job's log or a file it is noise.
               disable=not cfg.train.progress or rank != 0 or not sys.stderr.isatty(),
               desc=cfg.name, dynamic_ncols=True)
    books = Bookkeeping(
        cfg, steps=cfg.train.steps, val_every=cfg.train.val_every,
        checkpoint_every=cfg.train.checkpoint_every, checkpoint=checkpoint, score=evaluate,
        streams=streams, tracker=tracker, hooks=hooks, files=files, bar=bar, rank=rank,
        history=history)
    tasks_seen, waited, t_start = 0, 0.0, time.perf_counter()
    # A SIGTERM (preemption) ends the loop after the step in flight, checkpointed; every
    # rank learns of it in the step's all-reduce, so all stop after the same step.
    with sigterm_deferred() as signalled:
        for step in bar:
            t_fetch = time.perf_counter()
            batch, order = batch_at(step)
            waited += time.perf_counter() - t_fetch
            with autocast():
                this_step = early_step if step < cfg.algorithm.first_order_steps else meta_step
                grads, sums = meta_gradient(
                    model, params, batch, this_step, inner_loop=inner_loop, chunk=chunk,
                    order=order, carried=carried, recompute=recompute,
                    recompute_query=cfg.train.recompute_query,
                    step_weights=multi_step_weights(meta_step.inner_steps, step,
                                                    cfg.algorithm.msl_steps),
                )
            stop_asked = signalled() or (hooks.stop is not None and hooks.stop())
            stats = torch.tensor([sums["loss"], sums["accuracy"], batch.support_x.shape[0],
                                  float(stop_asked)])
            moments = [] if carried is None else carried.pending_tensors()
            *reduced, stats = all_reduce_sum([grads[k] for k in params] + moments + [stats])
            n_tasks = stats[2].item()
            check_finite(stats[0].item(), f"the meta-training loss at step {step + 1}",
                         "the run diverged; lower algorithm.inner_lr or algorithm.outer_lr, "
                         "or check the data")
            for p, g in zip(params.values(), reduced):
                p.grad = g / n_tasks
            if carried is not None:
                carried.advance(reduced[len(params):], n_tasks, meta_step.inner_steps)
            optimizer.step()
            if schedule is not None:
                schedule.step()
            tasks_seen += n_tasks

            # -- what this step records, validates, checkpoints and reports ---------
            done = step + 1
            record = {"step": done, "train_loss": stats[0].item() / n_tasks,
                      "elapsed_s": time.perf_counter() - t_start}
            if schedule is not None:
                record["outer_lr"] = optimizer.param_groups[0]["lr"]
            if not batch.query_y.is_floating_point():
                record["train_accuracy"] = stats[1].item() / n_tasks
            rates = {"tasks_per_s": tasks_seen / record["elapsed_s"],
                     "data_wait_fraction": waited / record["elapsed_s"]}
            if books.logs(done):  # Meta-SGD's learned rates: a pass over every tensor
                rates.update(learned_rate_means(params))
            books.step_done(record, rates, stopping=stats[3].item() > 0)
    train_seconds = time.perf_counter() - t_start

    # -- final checkpoint and meta-test ------------------------------------------
    return books.finish(inner_loop=inner_loop, chunk=chunk, train_seconds=train_seconds,
                        steps=cfg.train.steps, resumed_from_step=start, device=str(device),
                        workers=world, data_wait_fraction=waited / max(train_seconds, 1e-9))


class RunFiles:
    """The run directory. Only the worker that ``writes`` (rank 0) touches it; on the
    others every method does nothing and returns None, so the loop has no rank branches."""

    def __init__(self, root: str | Path, *, writes: bool) -> None:
        self.root, self.writes = Path(root), writes
        self.created = writes and not self.root.exists()  # only then may a failure remove it
        if writes:
            self.root.mkdir(parents=True, exist_ok=True)

    def write_config(self, cfg: Config) -> None:
        if self.writes:
            (self.root / "config.yaml").write_text(to_yaml(cfg))

    def checkpoint(self, name: str, state: Callable[[], dict[str, Any]]) -> Path | None:
        """``state()`` is only gathered where it is written."""
        if not self.writes:
            return None
        return save_checkpoint(self.root / "checkpoints" / name, state())

    def write_result(self, result: dict[str, Any], history: list[dict[str, float]]) -> None:
        if self.writes:
            (self.root / "result.json").write_text(json.dumps(result, indent=2))
            (self.root / "history.json").write_text(json.dumps(history))


# What a run writes before it has anything worth keeping: its config copy, its workers'
# pid files, and Ray's marker in its storage folder.
RUN_SCAFFOLD = {"config.yaml", "workers", ".validate_storage_marker"}


def discard_unused_run(root: Path) -> bool:
    """Remove the directory of a run that failed before writing a checkpoint or a result,
    so failed attempts do not pile up among the runs. A directory holding anything else
    (a checkpoint to resume from, a file that is not the run's) is left as it is."""
    if not root.is_dir():
        return False
    for path in root.rglob("*"):
        rel = path.relative_to(root).parts
        if rel[0] not in RUN_SCAFFOLD or (
                len(rel) > 1 and not (rel[0] == "workers" and len(rel) == 2
                                      and rel[1].startswith("rank-") and path.is_file())):
            return False
    shutil.rmtree(root, ignore_errors=True)
    return True


def make_optimizer(cfg: Config, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if cfg.algorithm.outer_optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.algorithm.outer_lr)
    return torch.optim.Adam(params, lr=cfg.algorithm.outer_lr)


def make_schedule(cfg: Config, optimizer: torch.optim.Optimizer):
    """β annealed from outer_lr to outer_lr_final over train.steps, linearly (Reptile's
    meta-step schedule) or along a half cosine (MAML++'s); None: β stays constant. The
    rate is a function of the step and of train.steps alone, so a resumed run, or one
    extended on resume, needs no saved state."""
    final = cfg.algorithm.outer_lr_final
    if final is None:
        return None
    end, total = final / cfg.algorithm.outer_lr, max(cfg.train.steps, 1)
    if cfg.algorithm.outer_lr_schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: end + (1 - end) * 0.5
                                                 * (1 + math.cos(math.pi * min(step, total)
                                                                 / total)))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 1 + (end - 1) * min(step, total) / total
    )


def restore(path, model, params, optimizer, schedule=None, carried: CarriedMoments | None = None
            ) -> tuple[int, list[dict[str, float]]]:
    trained = load_trained(path, model=model)
    state = trained.state
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(trained.params[k])
    optimizer.load_state_dict(state["optimizer"])
    if carried is not None:
        if state.get("inner_moments") is None:
            raise ValueError(f"{path}: the checkpoint has no inner Adam state to carry on "
                             "(it was trained with algorithm.inner_state=task)")
        carried.load_state_dict(state["inner_moments"], next(iter(params.values())).device)
    if schedule is not None:
        schedule.last_epoch = int(state["step"])
        for group, base, factor in zip(optimizer.param_groups, schedule.base_lrs,
                                       schedule.lr_lambdas):
            group["lr"] = base * factor(schedule.last_epoch)
    if "rng" in state:
        set_rng_state(state["rng"])
    return int(state["step"]), list(state.get("history", []))


def probe_batch(streams: Streams, step: MetaStep, cfg: Config, tasks: int,
                device: torch.device) -> tuple[MetaBatch, torch.Tensor | None]:
    """The first ``tasks`` training tasks and their inner minibatches: what rank 0
    measures the paths on before the run (reading them draws no random numbers)."""
    probe = MetaBatch(*(t.to(device) for t in episode_batch(streams.train, 0, tasks)))
    order = step.minibatches(probe.support_x.shape[1], cfg.train.seed,
                             range(probe.support_x.shape[0]), device)
    return probe, order


def agree_on_inner_loop(model, params, streams: Streams, step: MetaStep, cfg: Config,
                        tasks: int, device: torch.device, chunks: dict[str, int]) -> str:
    """``train.inner_loop=auto``: rank 0 (which always has tasks) times both paths on a
    real batch of its size, vmap at ``chunks["vmap"]`` tasks per call; every worker must
    then run the path it picked."""
    rank, _ = rank_and_world()
    choice = torch.tensor([0.0])
    if rank == 0:
        probe, order = probe_batch(streams, step, cfg, tasks, device)
        picked = pick_inner_loop(model, params, probe, step, chunks["vmap"], order,
                                 recompute=cfg.train.recompute_inner,
                                 recompute_query=cfg.train.recompute_query)
        choice[0] = float(picked == "vmap")
    return "vmap" if all_reduce_sum([choice])[0].item() > 0 else "loop"


def agree_on_chunks(model, params, streams: Streams, step: MetaStep, cfg: Config,
                    tasks: int, device: torch.device, paths: tuple[str, ...]) -> dict[str, int]:
    """``train.max_memory_gb``: rank 0 measures the peak memory of one task's
    meta-gradient on each of ``paths`` (``metadist.training.memory``); every worker gets,
    for each path that fits the budget, the tasks per chunk (the loop: 1). No path fits:
    every worker raises MemoryBudgetError with the smallest measured need."""
    rank, _ = rank_and_world()
    budget = cfg.train.max_memory_gb
    measured = torch.zeros(2 * len(paths), dtype=torch.float64)  # (chunk, need) per path
    what = ""
    if rank == 0:
        probe, order = probe_batch(streams, step, cfg, 1, device)
        notes = []
        for i, path in enumerate(paths):
            need, what = one_task_peak(
                model, params, probe, step, path, order, cfg.train.recompute_inner, device,
                multi_step_weights(step.inner_steps, 0, cfg.algorithm.msl_steps),
                recompute_query=cfg.train.recompute_query)
            try:  # the loop takes one task at a time
                chunk = chunk_for_budget(budget, need, tasks if path == "vmap" else 1)
            except MemoryBudgetError:
                chunk = 0
            measured[2 * i], measured[2 * i + 1] = chunk, need
            notes.append(f"{path} {need / 1e9:.3g} GB -> " + (
                f"{chunk} of {tasks} tasks at a time" if chunk else "does not fit"))
        tqdm.write(f"memory (train.max_memory_gb={budget:g}, one task's meta-gradient, "
                   f"{what}" + (", inner steps recomputed" if cfg.train.recompute_inner
                                else "")
                   + (", query blocks recomputed" if cfg.train.recompute_query else "")
                   + "): " + "; ".join(notes))
    measured = all_reduce_sum([measured])[0]
    chunks = {path: int(measured[2 * i].item()) for i, path in enumerate(paths)
              if measured[2 * i].item() > 0}
    if not chunks:
        need = min(measured[2 * i + 1].item() for i in range(len(paths)))
        chunk_for_budget(budget, int(need), tasks, what or "measured on rank 0")  # raises
    return chunks


def one_task_peak(model, params, batch: MetaBatch, step: MetaStep, inner_loop: str,
                  order: torch.Tensor | None, recompute: bool, device: torch.device,
                  step_weights: list[float] | None = None, recompute_query: bool = False
                  ) -> tuple[int, str]:
    """The peak memory (bytes) of the meta-gradient of ``batch``'s first task on
    ``inner_loop``, after a warm-up run (caches that a run keeps anyway are not counted),
    and what was measured. ``step_weights``: the multi-step loss of the first meta-steps,
    which keeps a query graph per inner step."""
    one = MetaBatch(*(t[:1] for t in batch))
    order = None if order is None else order[:1]

    def run():
        return meta_gradient(model, params, one, step, inner_loop=inner_loop, order=order,
                             recompute=recompute, step_weights=step_weights,
                             recompute_query=recompute_query)

    run()
    _, need, what = peak_memory(run, device)
    return need, what


def pick_inner_loop(model, params, batch: MetaBatch, step: MetaStep, chunk: int,
                    order: torch.Tensor | None = None, recompute: bool = False,
                    recompute_query: bool = False) -> str:
    """Time one meta-gradient of each path on a real batch and keep the faster one."""
    timings = {}
    for inner_loop in ("loop", "vmap"):
        for _ in range(2):  # a warm-up, then the timed one
            t0 = time.perf_counter()
            meta_gradient(model, params, batch, step, inner_loop=inner_loop, chunk=chunk,
                          order=order, recompute=recompute, recompute_query=recompute_query)
        timings[inner_loop] = time.perf_counter() - t0
    best = min(timings, key=timings.get)
    tqdm.write(
        "inner loop: " + ", ".join(f"{k} {v * 1e3:.0f} ms/step" for k, v in timings.items())
        + f" -> {best}"
    )
    return best
