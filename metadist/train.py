"""The meta-training recipe, top to bottom: set-up, data, model, optimiser, the loop
(meta-batch -> inner loops -> meta-gradient -> outer step), validation, checkpoints and
the final meta-test. Tracking is handed in (MLflow in the CLI, nothing in plain PyTorch
use); this module imports neither Ray nor MLflow.
"""

from __future__ import annotations

import json
import random
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from metadist.algorithms import MetaStep, meta_gradient
from metadist.checkpoint import load_checkpoint, save_checkpoint
from metadist.config import Config, to_dict, to_yaml
from metadist.data.episodes import MetaBatch
from metadist.data.streams import open_streams
from metadist.evaluate import meta_test
from metadist.models import build_model, model_spec


class NullTracker:
    """Tracking that records nothing: the default outside the CLI."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_result(self, result: dict[str, Any], history: list[dict[str, float]]) -> None: ...


def train(config: Config, tracker=None, resume: str | Path | None = None) -> dict[str, Any]:
    tracker = tracker or NullTracker()
    cfg = config
    # -- set-up ---------------------------------------------------------------
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    run_dir = Path(cfg.train.output_dir) / f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S-%f}"
    run_dir.mkdir(parents=True, exist_ok=False)
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
    optimizer = make_optimizer(cfg, list(params.values()))
    meta_step = MetaStep(
        cfg.algorithm.name, cfg.algorithm.inner_lr, cfg.algorithm.inner_steps,
        cfg.algorithm.first_order,
    )
    test_step = MetaStep(
        cfg.algorithm.name, cfg.algorithm.inner_lr, cfg.algorithm.test_inner_steps, True
    )
    start = 0
    history: list[dict[str, float]] = []
    if resume is not None:
        start, history = restore(resume, params, optimizer)

    def batch_at(step: int) -> MetaBatch:
        batch = streams.train.meta_batch(step, cfg.algorithm.meta_batch_size)
        return MetaBatch(*(t.to(device) for t in batch))

    inner_loop = cfg.train.inner_loop
    if inner_loop == "auto":
        inner_loop = pick_inner_loop(model, params, batch_at(start), meta_step, cfg.train.chunk)

    def checkpoint(step: int, name: str) -> Path:
        return save_checkpoint(run_dir / "checkpoints" / name, {
            "config": to_dict(cfg),
            "model": model_spec(model),
            "preprocessing": None if streams.preprocessing is None
            else vars(streams.preprocessing),
            "params": {k: v.detach().cpu() for k, v in params.items()},
            "optimizer": optimizer.state_dict(),
            "step": step,
            "history": history,
        })

    def validate(source, episodes: int, split: str) -> dict[str, Any]:
        return meta_test(
            model, params, source, test_step, episodes=episodes,
            batch_size=cfg.eval.batch_size, inner_loop=inner_loop, chunk=cfg.train.chunk,
            device=device, protocol=protocol(cfg, split, episodes),
        )

    # -- the loop ---------------------------------------------------------------
    bar = tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps,
               disable=not cfg.train.progress, desc=cfg.name, dynamic_ncols=True)
    tasks_seen, t_start = 0, time.perf_counter()
    for step in bar:
        batch = batch_at(step)
        grads, sums = meta_gradient(
            model, params, batch, meta_step, inner_loop=inner_loop, chunk=cfg.train.chunk
        )
        n_tasks = batch.support_x.shape[0]
        for name, p in params.items():
            p.grad = grads[name] / n_tasks
        optimizer.step()
        tasks_seen += n_tasks

        done = step + 1
        record = {"step": done, "train_loss": sums["loss"] / n_tasks}
        if not batch.query_y.is_floating_point():
            record["train_accuracy"] = sums["accuracy"] / n_tasks
        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
            record["tasks_per_s"] = tasks_seen / (time.perf_counter() - t_start)
            tracker.log_metrics({k: v for k, v in record.items() if k != "step"}, done)
            bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k != "step"})
        if cfg.train.val_every and (done % cfg.train.val_every == 0 or done == cfg.train.steps):
            val = validate(streams.val, cfg.train.val_episodes, cfg.data.val_split)
            record["val_" + val["metric"]] = val["mean"]
            record["val_" + val["metric"] + "_ci95"] = val["ci95"]
            tracker.log_metrics({k: v for k, v in record.items() if k.startswith("val_")}, done)
            bar.write(f"step {done}: val {val['metric']} {val['mean']:.4f} ± {val['ci95']:.4f}")
        history.append(record)
        if cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0:
            checkpoint(done, f"step-{done:07d}.pt")
    bar.close()
    train_seconds = time.perf_counter() - t_start

    # -- final checkpoint and meta-test ------------------------------------------
    final = checkpoint(cfg.train.steps, "final.pt")
    result = validate(streams.test, cfg.eval.episodes, cfg.data.test_split)
    result.update(
        run_dir=str(run_dir), checkpoint=str(final), inner_loop=inner_loop,
        train_seconds=train_seconds, steps=cfg.train.steps, device=str(device),
    )
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    (run_dir / "history.json").write_text(json.dumps(history))
    tracker.log_metrics({f"test_{result['metric']}": result["mean"],
                         f"test_{result['metric']}_ci95": result["ci95"]}, cfg.train.steps)
    tracker.log_result(result, history)
    return result


def protocol(cfg: Config, split: str, episodes: int) -> dict[str, Any]:
    return {
        "dataset": cfg.data.dataset, "split": split, "ways": cfg.data.ways,
        "shots": cfg.data.shots, "queries": cfg.data.queries, "seed": cfg.eval.seed,
        "algorithm": cfg.algorithm.name, "episodes": episodes,
    }


def make_optimizer(cfg: Config, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if cfg.algorithm.outer_optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.algorithm.outer_lr)
    return torch.optim.Adam(params, lr=cfg.algorithm.outer_lr)


def restore(path, params, optimizer) -> tuple[int, list[dict[str, float]]]:
    state = load_checkpoint(path)
    missing = set(params) ^ set(state["params"])
    if missing:
        raise ValueError(f"{path}: checkpoint parameters do not match the model: {sorted(missing)}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state["params"][k])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), list(state.get("history", []))


def pick_inner_loop(model, params, batch: MetaBatch, step: MetaStep, chunk: int) -> str:
    """Time one meta-gradient of each path on a real batch and keep the faster one."""
    timings = {}
    for inner_loop in ("loop", "vmap"):
        meta_gradient(model, params, batch, step, inner_loop=inner_loop, chunk=chunk)  # warm-up
        t0 = time.perf_counter()
        meta_gradient(model, params, batch, step, inner_loop=inner_loop, chunk=chunk)
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
