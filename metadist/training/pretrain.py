"""The supervised pre-training recipe, top to bottom: set-up, data, model, optimiser, the
loop (batch -> micro-batches -> summed gradients all-reduced -> SGD step), few-shot
validation, checkpoints and the final meta-test.

This is the first stage of Meta-Baseline (Chen et al. 2021, "Classifier-Baseline"): the
backbone and a linear classifier trained with cross-entropy on every image of every class
of the training split. What it leaves is a backbone that ``model.pretrained`` starts
meta-training from (any algorithm), or that a prototype head uses as it is: its
validation and its final test are the meta-test protocol of ``metadist train``
(``evaluate_split``) with the config's algorithm, a prototypical network on the
pre-trained features (``algorithm.name=protonet``).

Data-parallel as meta-training is: every step's batch is cut into micro-batches of
``pretrain.micro_batch`` images (one forward pass and one set of batch-norm statistics
each), worker r computes its contiguous share of them, the summed gradients are
all-reduced in buckets, and every worker takes the same SGD step. Every random choice (the
epoch's order, each image's crop and flip, DropBlock's masks) is a function of
(train.seed, step, position in the batch), drawn for the whole batch on every worker:
1 and N workers take the same steps, and a resumed run continues the identical trajectory
with nothing but the step (and the optimiser's momentum) to restore.
"""

from __future__ import annotations

import math
import sys
import time
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from metadist.algorithms import MetaStep
from metadist.config import Config, PretrainConfig, check_pretraining, to_dict
from metadist.data.augment import Augmentation
from metadist.data.episodes import Preprocessing
from metadist.data.labelled import LabelledImages
from metadist.models import build_model, model_spec
from metadist.models.layers import DropBlock
from metadist.training.bookkeeping import Bookkeeping
from metadist.training.checkpoint import (
    load_trained,
    pretrained_backbone,
    rng_state,
    set_rng_state,
)
from metadist.training.distributed import (
    all_reduce_sum,
    broadcast_from_rank0,
    rank_and_world,
    shard_bounds,
)
from metadist.training.evaluate import evaluate_split
from metadist.training.loop import Hooks, NullTracker, RunFiles, discard_unused_run
from metadist.training.runtime import check_finite, resolve_device, seed_everything
from metadist.training.signals import sigterm_deferred
from metadist.training.streams import open_streams

# The streams of random numbers a run draws, each keyed by (train.seed, stream, ...).
ORDER, AUGMENT, DROPBLOCK = 1, 2, 3


def pretrain(
    config: Config,
    tracker=None,
    resume: str | Path | None = None,
    *,
    run_dir: str | Path | None = None,
    hooks: Hooks | None = None,
) -> dict[str, Any]:
    """Pre-train, then meta-test the backbone with the config's few-shot head (or, with
    ``train.final_test=false``, end on the validation split). A SIGTERM, or
    ``hooks.stop()`` turning true, ends the loop after the step in flight with a
    checkpoint and raises ``Stopped``, as ``metadist.training.loop.train`` does."""
    check_pretraining(config)
    rank, world = rank_and_world()
    files = RunFiles(run_dir or Path(config.train.output_dir)
                     / f"{config.name}-{datetime.now():%Y%m%d-%H%M%S-%f}", writes=rank == 0)
    try:
        return _pretrain(config, files, tracker if rank == 0 else None,
                         resume or config.resume, hooks or Hooks(), rank, world)
    except BaseException:
        if files.created:
            discard_unused_run(files.root)
        raise


def _pretrain(cfg: Config, files: RunFiles, tracker, resume: str | Path | None, hooks: Hooks,
              rank: int, world: int) -> dict[str, Any]:
    tracker = tracker if tracker is not None else NullTracker()
    p = cfg.pretrain
    # -- set-up ---------------------------------------------------------------
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    files.write_config(cfg)

    # The batch's micro-batches, and this worker's share of them.
    batch_size = p.batch_size
    groups = micro_batches(p, world)
    g_lo, g_hi = shard_bounds(len(groups), rank, world)
    mine = groups[g_lo:g_hi]

    # -- data: every image of the training split's classes, and the episodes ---
    streams = open_streams(cfg.data, train_seed=cfg.train.seed, eval_seed=cfg.eval.seed)
    pre = streams.preprocessing
    images = LabelledImages(streams.train.store)
    per_epoch = len(images) // batch_size
    if per_epoch < 1:
        raise ValueError(f"pretrain.batch_size={batch_size} is more than the {len(images)} "
                         f"images of split {cfg.data.train_split!r}")
    images.decode_all()
    total = p.steps if p.steps is not None else p.epochs * per_epoch
    augmentation = Augmentation(augment_kind(p, pre), pre.image_size, p.crop_padding,
                                fill=255 if pre.invert else 0)

    @lru_cache(maxsize=2)
    def epoch_order(epoch: int) -> np.ndarray:
        return np.random.default_rng([cfg.train.seed, ORDER, epoch]).permutation(len(images))

    def micro_batch(step: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Images lo..hi-1 of batch ``step``, augmented and preprocessed, and labels."""
        epoch, b = divmod(step, per_epoch)
        batch = epoch_order(epoch)[b * batch_size:(b + 1) * batch_size]
        draws = augmentation.draws(np.random.default_rng([cfg.train.seed, AUGMENT, step]),
                                   batch_size)
        x, y = images.load(batch[lo:hi])
        x = pre.apply(augmentation.apply(x, draws[lo:hi]))
        if p.channels_last:  # every layer after keeps the format (.to keeps it too)
            x = x.contiguous(memory_format=torch.channels_last)
        return x.to(device), y.to(device)

    # -- model: the backbone and a linear head over every training class ------
    model = build_model(cfg.model, ways=images.num_classes, in_channels=pre.channels,
                        image_size=pre.image_size)
    params = model.init_params(torch.Generator().manual_seed(cfg.train.seed))
    if cfg.model.pretrained:  # go on from another run's backbone; the head starts anew
        params.update(pretrained_backbone(cfg.model.pretrained, model))
    params = {k: v.to(device).requires_grad_() for k, v in params.items()}
    broadcast_from_rank0(list(params.values()))
    test_step = MetaStep.from_config(cfg.algorithm, test=True)

    # -- optimiser and schedule -------------------------------------------------
    optimizer = torch.optim.SGD(list(params.values()), lr=p.lr, momentum=p.momentum,
                                nesterov=p.nesterov, weight_decay=p.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(p, per_epoch, total))
    start, history = 0, []
    if resume is not None:
        start, history = restore(resume, model, params, optimizer, schedule, per_epoch)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=cfg.train.precision == "bf16")

    def checkpoint(step: int, name: str) -> Path | None:
        return files.checkpoint(name, lambda: {
            "config": to_dict(cfg),
            "model": model_spec(model),
            "preprocessing": vars(pre),
            "params": {k: v.detach().cpu() for k, v in params.items()},
            "optimizer": optimizer.state_dict(),
            "step": step,
            "rng": rng_state(),
            "history": history,
            "pretrain": {"steps": total, "steps_per_epoch": per_epoch,
                         "images": len(images), "classes": images.store.class_names,
                         "augment": augmentation.kind},
        })

    def evaluate(source, episodes: int, split: str) -> dict[str, Any]:
        return evaluate_split(model, params, source, test_step, cfg, split, episodes,
                              device=device)

    val_every, checkpoint_every = (steps_of(p.val_every, per_epoch),
                                   steps_of(p.checkpoint_every, per_epoch))

    # -- the loop ---------------------------------------------------------------
    bar = tqdm(range(start, total), initial=start, total=total,
               disable=not cfg.train.progress or rank != 0 or not sys.stderr.isatty(),
               desc=f"{cfg.name} (pre-training)", dynamic_ncols=True)
    books = Bookkeeping(
        cfg, steps=total, val_every=val_every, checkpoint_every=checkpoint_every,
        checkpoint=checkpoint, score=evaluate, streams=streams, tracker=tracker, hooks=hooks,
        files=files, bar=bar, rank=rank, history=history,
        label=lambda done: f"step {done} (epoch {done / per_epoch:.3g})")
    seen, waited, t_start = 0, 0.0, time.perf_counter()
    with sigterm_deferred() as signalled:
        for step in bar:
            sums = torch.zeros(2, dtype=torch.float64)  # summed loss, correct predictions
            for lo, hi in mine:
                t_fetch = time.perf_counter()
                x, y = micro_batch(step, lo, hi)
                waited += time.perf_counter() - t_fetch
                with autocast():
                    drop = dropblock(p, cfg.train.seed, step, total, lo, hi)
                    logits = model.head(params, model.features(params, x, **drop))
                loss = F.cross_entropy(logits.float(), y, reduction="sum",
                                       label_smoothing=p.label_smoothing)
                loss.backward()  # the micro-batches' gradients add up in .grad
                sums += torch.stack([loss.detach().double().cpu(),
                                     (logits.argmax(-1) == y).sum().double().cpu()])
            stop_asked = signalled() or (hooks.stop is not None and hooks.stop())
            stats = torch.cat([sums, torch.tensor([float(sum(hi - lo for lo, hi in mine)),
                                                   float(stop_asked)], dtype=torch.float64)])
            grads = [v.grad if v.grad is not None else torch.zeros_like(v)
                     for v in params.values()]
            *reduced, stats = all_reduce_sum(grads + [stats])
            n = stats[2].item()
            check_finite(stats[0].item(), f"the pre-training loss at step {step + 1}",
                         "the run diverged; lower pretrain.lr, or check the data")
            for v, g in zip(params.values(), reduced):
                v.grad = g / n
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = optimizer.param_groups[0]["lr"]
            schedule.step()
            seen += n

            # -- what this step records, validates, checkpoints and reports ---------
            done = step + 1
            elapsed = time.perf_counter() - t_start
            books.step_done({"step": done, "epoch": done / per_epoch,
                             "train_loss": stats[0].item() / n,
                             "train_accuracy": stats[1].item() / n, "lr": lr,
                             "elapsed_s": elapsed},
                            {"images_per_s": seen / elapsed,
                             "data_wait_fraction": waited / elapsed},
                            stopping=stats[3].item() > 0)
    train_seconds = time.perf_counter() - t_start

    # -- final checkpoint and meta-test ------------------------------------------
    return books.finish(
        stage="pretrain", steps=total, epochs=total / per_epoch, steps_per_epoch=per_epoch,
        classes=images.num_classes, images=len(images), augment=augmentation.kind,
        micro_batch=groups[0][1], train_seconds=train_seconds, resumed_from_step=start,
        device=str(device), workers=world, data_wait_fraction=waited / max(train_seconds, 1e-9),
    )


def micro_batches(p: PretrainConfig, workers: int) -> list[tuple[int, int]]:
    """The [lo, hi) rows of each micro-batch of a batch; ValueError when there are fewer
    than ``workers`` (a worker would have none)."""
    micro = p.micro_batch or p.batch_size
    groups = [(lo, min(lo + micro, p.batch_size)) for lo in range(0, p.batch_size, micro)]
    if workers > len(groups):
        raise ValueError(
            f"{workers} workers share each batch of pretrain.batch_size={p.batch_size} by "
            f"micro-batches, and pretrain.micro_batch={p.micro_batch} makes {len(groups)}: "
            f"set pretrain.micro_batch to {p.batch_size // workers} or less (a micro-batch "
            "is a batch-norm statistics' group, so the result does not depend on the workers)")
    return groups


def augment_kind(p: PretrainConfig, pre: Preprocessing) -> str:
    """``pretrain.augment``, ``auto`` resolved: none for 1-channel images (Omniglot's
    strokes), the padded crop and flip for RGB."""
    if p.augment != "auto":
        return p.augment
    return "none" if pre.channels == 1 else "crop_flip"


def steps_of(epochs: float, per_epoch: int) -> int:
    """An interval given in epochs, in steps (at least 1); 0: never."""
    return max(1, round(epochs * per_epoch)) if epochs else 0


def lr_factor(p: PretrainConfig, per_epoch: int, total: int):
    """The rate's factor at step t: x gamma at each milestone epoch passed (step), a half
    cosine to 0 over the run (cosine), or 1. A function of the step alone: a resumed run
    needs no scheduler state."""
    milestones = [m * per_epoch for m in p.milestones]
    if p.schedule == "step":
        return lambda t: p.gamma ** sum(t >= m for m in milestones)
    if p.schedule == "cosine":
        return lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total) / max(total, 1)))
    return lambda t: 1.0


def dropblock(p: PretrainConfig, seed: int, step: int, total: int, lo: int, hi: int
              ) -> dict[str, DropBlock]:
    """``features``' keyword for rows lo..hi of batch ``step`` of ``total``: DropBlock at a
    rate rising linearly to ``pretrain.dropblock_rate`` over the run, its noise drawn for
    the whole batch from (seed, step, block) and sliced, so a row's mask is the same
    whichever worker computes it; {} when off."""
    if not p.dropblock_rate:
        return {}

    def noise(block: int, shape: tuple[int, ...]) -> torch.Tensor:
        generator = torch.Generator().manual_seed(stream_seed(seed, DROPBLOCK, step, block))
        return torch.rand((p.batch_size, *shape[1:]), generator=generator)[lo:hi]

    rate = p.dropblock_rate * min(1.0, (step + 1) / total)
    return {"drop": DropBlock(rate, p.dropblock_size, noise)}


def stream_seed(*key: int) -> int:
    """A 32-bit seed for a torch generator from a key of integers."""
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


def restore(path, model, params, optimizer, schedule, per_epoch: int
            ) -> tuple[int, list[dict[str, float]]]:
    """Continue a pre-training checkpoint: its parameters, the optimiser's momentum, the
    step (which fixes every random draw from here on) and the history."""
    trained = load_trained(path, model=model)
    state = trained.state
    if "pretrain" not in state:
        raise ValueError(f"{path}: not a pre-training checkpoint (a meta-training run's "
                         "checkpoint resumes with `metadist train --resume`)")
    if state["pretrain"]["steps_per_epoch"] != per_epoch:
        raise ValueError(f"{path}: its epochs had {state['pretrain']['steps_per_epoch']} "
                         f"steps, and this run's have {per_epoch}: the data or "
                         "pretrain.batch_size changed")
    with torch.no_grad():
        for k, v in params.items():
            v.copy_(trained.params[k])
    optimizer.load_state_dict(state["optimizer"])
    schedule.last_epoch = int(state["step"])
    for group, base, factor in zip(optimizer.param_groups, schedule.base_lrs,
                                   schedule.lr_lambdas):
        group["lr"] = base * factor(schedule.last_epoch)
    set_rng_state(state["rng"])
    return int(state["step"]), list(state.get("history", []))
