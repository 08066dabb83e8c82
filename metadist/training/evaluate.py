"""The meta-test protocol: a fixed, seeded set of episodes from held-out classes, adapted
from the meta-learned initialisation, scored on their query sets, reported as the mean
with a 95% confidence interval (1.96 · std / √n, std over episodes, ddof=0).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from metadist.algorithms import TEMPERATURE_KEY, CarriedMoments, MetaStep, adapted_scores
from metadist.config import Config
from metadist.data.episodes import MetaBatch
from metadist.training.checkpoint import load_trained
from metadist.training.distributed import all_reduce_sum, rank_and_world, shard_bounds
from metadist.training.runtime import check_finite, resolve_device
from metadist.training.streams import episode_batch, open_streams


def meta_test(
    model,
    params: dict[str, torch.Tensor],
    episodes_source,
    step: MetaStep,
    *,
    episodes: int,
    batch_size: int = 50,
    inner_loop: str = "loop",
    chunk: int = 0,
    device: torch.device | str = "cpu",
    protocol: dict[str, Any] | None = None,
    order_seed: int = 0,
    carried: CarriedMoments | None = None,
) -> dict[str, Any]:
    """Episodes 0..episodes-1 of ``episodes_source`` (a sampler seeded for evaluation)."""
    loss, acc, classification = episode_scores(
        model, params, episodes_source, step, start=0, stop=episodes, batch_size=batch_size,
        inner_loop=inner_loop, chunk=chunk, device=device, order_seed=order_seed,
        carried=carried,
    )
    return summarize(loss, acc, classification, step, protocol, learned_temperature(params))


def evaluate_split(
    model,
    params: dict[str, torch.Tensor],
    source,
    step: MetaStep,
    cfg: Config,
    split: str,
    episodes: int,
    *,
    inner_loop: str = "loop",
    chunk: int = 0,
    device: torch.device | str = "cpu",
    carried: CarriedMoments | None = None,
) -> dict[str, Any]:
    """A run's validation or meta-test on ``episodes`` episodes of ``source`` (the
    ``split`` stream), reported with its protocol. Every worker of a process group scores
    its slice of the episodes and the sum fills in everyone's gaps, so all get the whole."""
    rank, world = rank_and_world()
    lo, hi = shard_bounds(episodes, rank, world)
    loss, acc, classification = episode_scores(
        model, params, source, step, start=lo, stop=hi, batch_size=cfg.eval.batch_size,
        inner_loop=inner_loop, chunk=chunk, device=device, order_seed=cfg.eval.seed,
        carried=carried,
    )
    full = torch.zeros(2, episodes, dtype=torch.float64)
    full[0, lo:hi], full[1, lo:hi] = loss, acc
    full = all_reduce_sum([full])[0]
    return summarize(full[0], full[1], classification, step, protocol(cfg, split, episodes),
                     learned_temperature(params))


def episode_scores(
    model,
    params: dict[str, torch.Tensor],
    source,
    step: MetaStep,
    *,
    start: int,
    stop: int,
    batch_size: int = 50,
    inner_loop: str = "loop",
    chunk: int = 0,
    device: torch.device | str = "cpu",
    order_seed: int = 0,
    carried: CarriedMoments | None = None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Per-episode query (loss, accuracy) of episodes start..stop-1, float64 on the CPU.
    With inner minibatches, episode i's follow (``order_seed``, i). ``carried``: the inner
    Adam's state that every episode starts from (``algorithm.inner_state=carried``)."""
    losses, accs = [torch.zeros(0, dtype=torch.float64)], [torch.zeros(0, dtype=torch.float64)]
    classification = not source.episode(0).query_y.is_floating_point()
    for lo in range(start, stop, batch_size):
        hi = min(lo + batch_size, stop)
        batch = MetaBatch(*(t.to(device) for t in episode_batch(source, lo, hi)))
        order = step.minibatches(batch.support_x.shape[1], order_seed, range(lo, hi), device)
        loss, acc = adapted_scores(
            model, params, batch, step, inner_loop=inner_loop, chunk=chunk, order=order,
            carried=carried,
        )
        losses.append(loss.cpu().double())
        accs.append(acc.cpu().double())
    return torch.cat(losses), torch.cat(accs), classification


def summarize(
    loss: torch.Tensor,
    acc: torch.Tensor,
    classification: bool,
    step: MetaStep,
    protocol: dict[str, Any] | None = None,
    temperature: float | None = None,
) -> dict[str, Any]:
    values = acc if classification else loss
    if not values.numel():
        raise ValueError("no episode to score: the meta-test needs at least one episode")
    metric = "accuracy" if classification else "mse"
    check_finite(values.mean().item(), f"the {metric} over {values.numel()} episodes",
                 "the adapted model produced NaN or infinite outputs (an inner learning "
                 "rate too large, or a diverged model)")
    report = {
        "metric": metric,
        "mean": values.mean().item(),
        "ci95": confidence_95(values),
        "loss": loss.mean().item(),
        "loss_ci95": confidence_95(loss),
        "episodes": values.numel(),
        # What adapted each episode: a protonet has no inner loop, Meta-SGD and LSLR
        # adapt at their learned rates.
        "inner_steps": 0 if step.algorithm == "protonet" else step.inner_steps,
        "inner_lr": ("learned" if step.algorithm == "metasgd" or step.lslr
                     else None if step.algorithm == "protonet" else step.inner_lr),
        "head": step.head if step.head != "prototypes" or step.metric == "euclidean"
        else f"prototypes ({step.metric}, temperature {step.temperature:g})"
        if temperature is None else
        f"prototypes ({step.metric}, learned temperature {temperature:.4g})",
        "batch_norm": "transductive (each episode's own statistics)",
    }
    report.update(protocol or {})
    return report


def learned_temperature(params: dict[str, torch.Tensor]) -> float | None:
    """The cosine prototypes' scale where it is a parameter (``learn_temperature``)."""
    value = params.get(TEMPERATURE_KEY)
    return None if value is None else value.detach().item()


def confidence_95(values: torch.Tensor) -> float:
    """Half-width of the normal-approximation 95% CI of the mean."""
    n = values.numel()
    return 1.96 * values.std(unbiased=False).item() / math.sqrt(n) if n else float("nan")


def protocol(cfg: Config, split: str, episodes: int) -> dict[str, Any]:
    """What a reported score was measured on: enough to run the same meta-test again."""
    return {
        "dataset": cfg.data.dataset, "split": split, "ways": cfg.data.ways,
        "shots": cfg.data.shots, "queries": cfg.data.queries, "seed": cfg.eval.seed,
        "algorithm": cfg.algorithm.name, "episodes": episodes,
        "inner_batch": MetaStep.from_config(cfg.algorithm, test=True).inner_batch,
        "inner_optimizer": cfg.algorithm.inner_optimizer,
        **({"inner_state": cfg.algorithm.inner_state}
           if cfg.algorithm.inner_optimizer == "adam" else {}),
    }


def evaluate_checkpoint(
    checkpoint: str,
    *,
    episodes: int | None = None,
    split: str | None = None,
    dataset: str | None = None,
    inner_steps: int | None = None,
    queries: int | None = None,
    ways: int | None = None,
    shots: int | None = None,
    metric: str | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Meta-test a saved model under the protocol of the config it was trained with.

    ``queries`` (per class) replaces the config's ``data.queries`` in the test episodes:
    papers differ here (Finn et al.'s code tests on as many queries as shots, Nichol et
    al.'s on one), and with batch statistics taken from the queries it moves the score.
    ``ways`` and ``shots`` replace ``data.ways`` and ``data.shots``; other ways need a
    model whose head is built per task. ``metric`` replaces ``algorithm.metric`` (a
    protonet's, or a pre-trained backbone's, prototypes: euclidean or cosine).
    """
    dev = resolve_device(device)
    trained = load_trained(checkpoint, dev)
    cfg = trained.config
    if dataset is not None:
        cfg.data.dataset = dataset
    if split is not None:
        cfg.data.test_split = split
    for name, value, low in (("queries", queries, 1), ("ways", ways, 2), ("shots", shots, 1)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        setattr(cfg.data, name, value)
    learned = getattr(trained.model, "ways", None)
    if ways is not None and learned is None:
        raise ValueError(f"ways={ways}: {checkpoint} is a regression model, which has no "
                         "classes")
    if ways is not None and ways != learned and \
            not MetaStep.from_config(cfg.algorithm, test=True).any_ways:
        raise ValueError(
            f"ways={ways}: {checkpoint} has a meta-learned head of {learned} "
            "classes; a model trained with algorithm.head_init=prototypes (or zero), or a "
            "protonet, takes any number")
    episodes = cfg.eval.episodes if episodes is None else episodes
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"episodes must be an integer >= 1, got {episodes!r}")
    streams = open_streams(cfg.data, train_seed=cfg.train.seed, eval_seed=cfg.eval.seed)
    if inner_steps is not None:
        cfg.algorithm.test_inner_steps = inner_steps
    if metric is not None:
        cfg.algorithm.metric = metric
        # A learned temperature scales cosine prototypes only; other metrics leave it be.
        cfg.algorithm.learn_temperature &= metric == "cosine"
    step = MetaStep.from_config(cfg.algorithm, test=True)
    result = meta_test(
        trained.model, trained.params, streams.test, step, episodes=episodes,
        batch_size=cfg.eval.batch_size, device=dev,
        protocol=protocol(cfg, cfg.data.test_split, episodes), order_seed=cfg.eval.seed,
        carried=trained.carried_moments(step, dev),
    )
    result.update(checkpoint=str(checkpoint), trained_steps=trained.state["step"])
    return result
