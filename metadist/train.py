"""The meta-training recipe, top to bottom: set-up, data, model, optimiser, the loop
(meta-batch -> inner loops -> all-reduced meta-gradient -> outer step), validation,
checkpoints and the final meta-test.

The same function is the loop of every worker: one process, each rank under ``torchrun``,
or each Ray Train worker (``metadist.ray_train``). When a process group is up, worker r
runs the inner loops of its slice of every meta-batch, the summed meta-gradients are
all-reduced, and every worker takes the same outer step. Tracking, checkpoint reporting
and the episode source are handed in; this module imports neither Ray nor MLflow.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from metadist.algorithms import CarriedMoments, MetaStep, meta_gradient
from metadist.checkpoint import load_checkpoint, save_checkpoint
from metadist.config import Config, to_dict, to_yaml
from metadist.data.episodes import MetaBatch
from metadist.data.streams import episode_batch, open_streams
from metadist.distributed import all_reduce_sum, broadcast_from_rank0, rank_and_world, shard_bounds
from metadist.evaluate import episode_scores, summarize
from metadist.models import build_model, check_params, model_spec
from metadist.signals import Stopped, sigterm_deferred


class NullTracker:
    """Tracking that records nothing: the default outside the CLI, and on ranks > 0."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_result(self, result: dict[str, Any], history: list[dict[str, float]]) -> None: ...

    def log_stop(self, step: int, checkpoint: Path) -> None: ...


def train(
    config: Config,
    tracker=None,
    resume: str | Path | None = None,
    *,
    batches: Callable[[int], MetaBatch] | None = None,
    report: Callable[[dict[str, float], Path | None], None] | None = None,
    run_dir: str | Path | None = None,
    stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Meta-train, then meta-test (or, with ``train.final_test=false``, end on the
    validation split: a tuning trial must never see the test classes).

    ``batches(step)`` overrides where this worker's share of meta-batch ``step`` comes
    from (the Ray episode pipeline). ``report(metrics, checkpoint)`` is called on every
    worker at each step that validated or checkpointed (Ray Train's and Ray Tune's
    report); ``metrics`` has the ``step``, rank 0 gets the checkpoint path, the others None.

    A SIGTERM to this process, or ``stop()`` turning true (polled once a step: a Ray
    Train driver's SIGTERM, passed on), ends the loop after the step in flight with a
    checkpoint, reported like the periodic ones, and raises ``Stopped`` (exit status 143).
    """
    cfg = config
    rank, world = rank_and_world()
    tracker = tracker if tracker is not None and rank == 0 else NullTracker()
    resume = resume or cfg.resume
    # -- set-up ---------------------------------------------------------------
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    if run_dir is None:
        run_dir = Path(cfg.train.output_dir) / f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S-%f}"
    run_dir = Path(run_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))

    # -- data, model, optimiser -----------------------------------------------
    streams = open_streams(cfg.data, train_seed=cfg.train.seed, eval_seed=cfg.eval.seed)
    model = build_model(
        cfg.model, ways=cfg.data.ways, in_channels=streams.in_channels,
        image_size=streams.image_size,
    )
    generator = torch.Generator().manual_seed(cfg.train.seed)
    params = {
        k: v.to(device).requires_grad_() for k, v in model.init_params(generator).items()
    }
    broadcast_from_rank0(list(params.values()))
    optimizer = make_optimizer(cfg, list(params.values()))
    schedule = make_schedule(cfg, optimizer)
    meta_batch_size = cfg.algorithm.meta_batch_size
    meta_step = MetaStep.from_config(cfg.algorithm)
    test_step = MetaStep.from_config(cfg.algorithm, test=True)
    # The inner Adam's state, when it runs on from task to task (algorithm.inner_state).
    carried = CarriedMoments() if meta_step.inner_state == "carried" else None
    start = 0
    history: list[dict[str, float]] = []
    if resume is not None:
        start, history = restore(resume, model, params, optimizer, schedule, carried)
    lo, hi = shard_bounds(meta_batch_size, rank, world)

    def batch_at(step: int) -> tuple[MetaBatch, torch.Tensor | None]:
        first = step * meta_batch_size
        if batches is not None:
            batch = batches(step)
        else:
            batch = episode_batch(streams.train, first + lo, first + hi)
        # Task i's inner minibatches follow (seed, i), as its episode does.
        order = meta_step.minibatches(batch.support_x.shape[1], cfg.train.seed,
                                      range(first + lo, first + hi), device)
        return MetaBatch(*(t.to(device) for t in batch)), order

    def autocast():
        # bf16 only: fp16 would need loss scaling through the inner loops' own gradients.
        return torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=cfg.train.precision == "bf16")

    inner_loop = cfg.train.inner_loop
    if inner_loop == "auto":
        # Every worker must run the same path; rank 0 (which always has tasks) decides.
        choice = torch.tensor([0.0])
        if rank == 0:
            probe = episode_batch(streams.train, 0, max(hi - lo, 1))
            probe = MetaBatch(*(t.to(device) for t in probe))
            order = meta_step.minibatches(probe.support_x.shape[1], cfg.train.seed,
                                          range(probe.support_x.shape[0]), device)
            with autocast():
                picked = pick_inner_loop(model, params, probe, meta_step, cfg.train.chunk,
                                         order)
            choice[0] = float(picked == "vmap")
        inner_loop = "vmap" if all_reduce_sum([choice])[0].item() > 0 else "loop"

    def checkpoint(step: int, name: str) -> Path | None:
        path = None
        if rank == 0:
            path = save_checkpoint(run_dir / "checkpoints" / name, {
                "config": to_dict(cfg),
                "model": model_spec(model),
                "preprocessing": None if streams.preprocessing is None
                else vars(streams.preprocessing),
                "params": {k: v.detach().cpu() for k, v in params.items()},
                "optimizer": optimizer.state_dict(),
                "inner_moments": None if carried is None else carried.state_dict(),
                "step": step,
                "sampler": {"seed": cfg.train.seed, "next_episode": step * meta_batch_size},
                "rng": rng_state(),
                "history": history,
            })
        return path

    def evaluate(source, episodes: int, split: str) -> dict[str, Any]:
        # Each worker scores its slice of the episodes; the sum fills in everyone's gaps.
        e_lo, e_hi = shard_bounds(episodes, rank, world)
        loss, acc, classification = episode_scores(
            model, params, source, test_step, start=e_lo, stop=e_hi,
            batch_size=cfg.eval.batch_size, inner_loop=inner_loop, chunk=cfg.train.chunk,
            device=device, order_seed=cfg.eval.seed, carried=carried,
        )
        full = torch.zeros(2, episodes, dtype=torch.float64)
        full[0, e_lo:e_hi], full[1, e_lo:e_hi] = loss, acc
        full = all_reduce_sum([full])[0]
        return summarize(full[0], full[1], classification, test_step,
                         protocol(cfg, split, episodes))

    # -- the loop ---------------------------------------------------------------
    bar = tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps,
               disable=not cfg.train.progress or rank != 0, desc=cfg.name, dynamic_ncols=True)
    tasks_seen, waited, t_start = 0, 0.0, time.perf_counter()
    last_val: dict[str, Any] | None = None
    # A SIGTERM (preemption) ends the loop after the step in flight, checkpointed; every
    # rank learns of it in the step's all-reduce, so all stop after the same step.
    with sigterm_deferred() as signalled:
        for step in bar:
            t_fetch = time.perf_counter()
            batch, order = batch_at(step)
            waited += time.perf_counter() - t_fetch
            with autocast():
                grads, sums = meta_gradient(
                    model, params, batch, meta_step, inner_loop=inner_loop,
                    chunk=cfg.train.chunk, order=order, carried=carried,
                )
            stats = torch.tensor([sums["loss"], sums["accuracy"], batch.support_x.shape[0],
                                  float(signalled() or (stop is not None and stop()))])
            moments = [] if carried is None else carried.pending_tensors()
            *reduced, stats = all_reduce_sum([grads[k] for k in params] + moments + [stats])
            n_tasks = stats[2].item()
            for p, g in zip(params.values(), reduced):
                p.grad = g / n_tasks
            if carried is not None:
                carried.advance(reduced[len(params):], n_tasks, meta_step.inner_steps)
            optimizer.step()
            if schedule is not None:
                schedule.step()
            tasks_seen += n_tasks

            done = step + 1
            record = {"step": done, "train_loss": stats[0].item() / n_tasks,
                      "elapsed_s": time.perf_counter() - t_start}
            if schedule is not None:
                record["outer_lr"] = optimizer.param_groups[0]["lr"]
            if not batch.query_y.is_floating_point():
                record["train_accuracy"] = stats[1].item() / n_tasks
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                record["tasks_per_s"] = tasks_seen / record["elapsed_s"]
                record["data_wait_fraction"] = waited / record["elapsed_s"]
                tracker.log_metrics({k: v for k, v in record.items() if k != "step"}, done)
                bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k != "step"})
            if cfg.train.val_every and (done % cfg.train.val_every == 0 or done == cfg.train.steps):
                val = last_val = evaluate(streams.val, cfg.train.val_episodes, cfg.data.val_split)
                record["val_" + val["metric"]] = val["mean"]
                record["val_" + val["metric"] + "_ci95"] = val["ci95"]
                tracker.log_metrics({k: v for k, v in record.items() if k.startswith("val_")},
                                    done)
                if rank == 0:
                    bar.write(f"step {done}: val {val['metric']} {val['mean']:.4f} "
                              f"± {val['ci95']:.4f}")
            history.append(record)
            checkpointed = (bool(cfg.train.checkpoint_every)
                            and done % cfg.train.checkpoint_every == 0)
            path = checkpoint(done, f"step-{done:07d}.pt") if checkpointed else None
            validated = any(k.startswith("val_") for k in record)
            # The last step is reported once, with the final checkpoint, below.
            reported = report is not None and (validated or checkpointed) and done < cfg.train.steps
            if reported:
                report(record, path)
            if stats[3].item() > 0:
                bar.close()
                if not checkpointed:
                    path = checkpoint(done, f"step-{done:07d}.pt")
                if report is not None and not reported:  # Ray's storage gets it too
                    report(record, path)
                if rank == 0:
                    if stop is None:  # else the driver that set stop() says it, once
                        print(f"SIGTERM: stopped after step {done} of {cfg.train.steps}; "
                              f"continue with resume={path}", file=sys.stderr, flush=True)
                    tracker.log_stop(done, path)
                raise Stopped(done, None if path is None else str(path))
    bar.close()
    train_seconds = time.perf_counter() - t_start

    # -- final checkpoint and meta-test ------------------------------------------
    final = checkpoint(cfg.train.steps, "final.pt")
    if cfg.train.final_test:
        result = evaluate(streams.test, cfg.eval.episodes, cfg.data.test_split)
    else:
        result = last_val or evaluate(streams.val, cfg.train.val_episodes, cfg.data.val_split)
    result.update(
        run_dir=str(run_dir), checkpoint=str(run_dir / "checkpoints" / "final.pt"),
        inner_loop=inner_loop, train_seconds=train_seconds, steps=cfg.train.steps,
        resumed_from_step=start, device=str(device), workers=world,
        data_wait_fraction=waited / max(train_seconds, 1e-9),
    )
    if rank == 0 and final is not None:
        (run_dir / "result.json").write_text(json.dumps(result, indent=2))
        (run_dir / "history.json").write_text(json.dumps(history))
    if cfg.train.final_test:
        tracker.log_metrics({f"test_{result['metric']}": result["mean"],
                             f"test_{result['metric']}_ci95": result["ci95"]}, cfg.train.steps)
    tracker.log_result(result, history)
    if report is not None:  # last: a scheduler may end this process once it has the result
        report(history[-1] if history else {"step": cfg.train.steps}, final)
    return result


def protocol(cfg: Config, split: str, episodes: int) -> dict[str, Any]:
    return {
        "dataset": cfg.data.dataset, "split": split, "ways": cfg.data.ways,
        "shots": cfg.data.shots, "queries": cfg.data.queries, "seed": cfg.eval.seed,
        "algorithm": cfg.algorithm.name, "episodes": episodes,
        "inner_batch": MetaStep.from_config(cfg.algorithm, test=True).inner_batch,
        "inner_optimizer": cfg.algorithm.inner_optimizer,
        **({"inner_state": cfg.algorithm.inner_state}
           if cfg.algorithm.inner_optimizer == "adam" else {}),
    }


def make_optimizer(cfg: Config, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if cfg.algorithm.outer_optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.algorithm.outer_lr)
    return torch.optim.Adam(params, lr=cfg.algorithm.outer_lr)


def make_schedule(cfg: Config, optimizer: torch.optim.Optimizer):
    """β annealed linearly from outer_lr to outer_lr_final over train.steps (Reptile's
    meta-step schedule); None: β stays constant. The rate is a function of the step and of
    train.steps alone, so a resumed run, or one extended on resume, needs no saved state."""
    final = cfg.algorithm.outer_lr_final
    if final is None:
        return None
    end, total = final / cfg.algorithm.outer_lr, max(cfg.train.steps, 1)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 1 + (end - 1) * min(step, total) / total
    )


def restore(path, model, params, optimizer, schedule=None, carried: CarriedMoments | None = None
            ) -> tuple[int, list[dict[str, float]]]:
    state = load_checkpoint(path)
    check_params(model, state["params"], str(path))
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state["params"][k])
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


def pick_inner_loop(model, params, batch: MetaBatch, step: MetaStep, chunk: int,
                    order: torch.Tensor | None = None) -> str:
    """Time one meta-gradient of each path on a real batch and keep the faster one."""
    timings = {}
    for inner_loop in ("loop", "vmap"):
        for _ in range(2):  # a warm-up, then the timed one
            t0 = time.perf_counter()
            meta_gradient(model, params, batch, step, inner_loop=inner_loop, chunk=chunk,
                          order=order)
        timings[inner_loop] = time.perf_counter() - t0
    best = min(timings, key=timings.get)
    tqdm.write(
        "inner loop: " + ", ".join(f"{k} {v * 1e3:.0f} ms/step" for k, v in timings.items())
        + f" -> {best}"
    )
    return best


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    # Plain data only (checkpoints load with weights_only=True).
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
        "python": json.dumps(random.getstate()),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    key = state["numpy"]["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, state["numpy"]["pos"], 0, 0.0))
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
