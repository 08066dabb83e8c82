"""Reptile's inner Adam state: zero per task, carried (metadist), or Nichol et al.'s order.

Nichol et al.'s code adapts every task with one TensorFlow Adam: its moments and step count
run on through meta-training, task after task, and each evaluation episode starts from the
state training left (restored after the episode). metadist's ``algorithm.inner_state``
offers ``task`` (zero moments in every task) and ``carried`` (every task of a meta-batch
starts from the carried state, which moves to the mean of the tasks' end states). The
``sequential`` mode here patches the inner loop to run their exact order instead; it is a
check of the ``carried`` design, not something metadist ships.

    python benchmarks/reptile_inner_state.py run task|carried|sequential CONFIG [overrides]
    python benchmarks/reptile_inner_state.py table MODE=RUN_DIR... > benchmarks/results/...md

``run`` is the single-process trainer (``metadist.worker``) under the mode; ``table``
prints the runs' test results and validation curves side by side.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch
import yaml

import metadist.algorithms.inner_loop as inner_loop
import metadist.algorithms.meta as meta
import metadist.training.evaluate as evaluate

STATE: dict = {"t": 0, "m": {}, "v": {}}  # the one Adam of Nichol et al.'s code
EVALUATING = [False]


def _one_adam(grads, moments, t, betas, eps=1e-8):
    """Adam's directions from the single state that every task runs on (their order)."""
    b1, b2 = betas
    STATE["t"] += 1
    out = {}
    for k, g in grads.items():
        g = g.detach()
        m = b1 * STATE["m"].get(k, torch.zeros_like(g)) + (1 - b1) * g
        v = b2 * STATE["v"].get(k, torch.zeros_like(g)) + (1 - b2) * g * g
        STATE["m"][k], STATE["v"][k] = m, v
        out[k] = (m / (1 - b1 ** STATE["t"])) / ((v / (1 - b2 ** STATE["t"])).sqrt() + eps)
    return out


def _patch_sequential() -> None:
    """Every inner step goes through one Adam state; an evaluation episode starts from
    training's state and restores it afterwards, as their ``evaluate`` does."""
    adapt, scores = meta.adapt_with_moments, meta.adapted_scores

    def adapt_with_moments(*args, **kwargs):
        if not EVALUATING[0]:
            return adapt(*args, **kwargs)
        saved = {"t": STATE["t"], "m": dict(STATE["m"]), "v": dict(STATE["v"])}
        try:
            return adapt(*args, **kwargs)
        finally:
            STATE.update(saved)

    def adapted_scores(*args, **kwargs):
        EVALUATING[0] = True
        try:
            return scores(*args, **kwargs)
        finally:
            EVALUATING[0] = False

    inner_loop._adam_directions = _one_adam
    meta.adapt_with_moments = adapt_with_moments
    meta.adapted_scores = evaluate.adapted_scores = adapted_scores


def run(mode: str, argv: list[str]) -> None:
    from metadist.worker import main

    if mode not in ("task", "carried", "sequential"):
        raise SystemExit(f"mode must be task, carried or sequential, got {mode!r}")
    if mode == "sequential":
        _patch_sequential()
    # The loop path runs the tasks one after another, which the sequential order needs.
    state = "carried" if mode == "carried" else "task"
    main([*argv, f"algorithm.inner_state={state}", "train.inner_loop=loop"])
    if mode == "sequential" and not STATE["t"]:
        raise SystemExit("the sequential patch never ran: metadist's inner loop has changed")


def table(runs: list[str]) -> str:
    rows = []
    for mode, d in (run.split("=", 1) for run in runs):
        d = Path(d)
        result = json.loads((d / "result.json").read_text())
        config = yaml.safe_load((d / "config.yaml").read_text())
        history = json.loads((d / "history.json").read_text())
        curve = ", ".join(f"{h['step']}: {100 * h['val_accuracy']:.1f}"
                          for h in history if "val_accuracy" in h)
        rows.append((mode, config, result, curve))
    _, config, result, _ = rows[0]
    lines = [
        "# Reptile's inner Adam state: zero per task, carried, or Nichol et al.'s order",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads here; each "
        "run used train.threads=1, two runs at a time on the 2-core development machine.",
        f"Setting: {config['name']} on {config['data']['dataset']}, "
        f"{config['train']['steps']:,} meta-steps (β annealed over them), "
        f"validation on {config['train']['val_episodes']} episodes every "
        f"{config['train']['val_every']} steps.",
        f"Protocol: {result['split']} split, {result['episodes']} episodes (seed "
        f"{result['seed']}), {result['queries']} queries per class, 95% CI, transductive "
        "batch norm.",
        "",
        "| inner Adam state | test accuracy (%) | validation accuracy by step (%) | train time |",
        "|---|---:|---|---:|",
    ]
    for mode, _, result, curve in rows:
        lines.append(f"| {mode} | {100 * result['mean']:.2f} ± "
                     f"{100 * result['ci95']:.2f} | {curve} | "
                     f"{result['train_seconds'] / 60:.0f} min |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("run", "table"):
        raise SystemExit(__doc__)
    if sys.argv[1] == "run":
        run(sys.argv[2], sys.argv[3:])
    else:
        print(table(sys.argv[2:]))
