"""What every training loop does after its optimiser step, and after its last step: log,
validate, keep the history, checkpoint, stop on a signal, report to a runner; then the
final checkpoint, the meta-test and the result. Meta-training (``loop.py``) and
pre-training (``pretrain.py``) differ in how a step is computed, not in any of this, so
a change here (when a stop is reported, which checkpoint a runner sees) reaches both.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from metadist.training.signals import Stopped

# (episode source, episodes, split name) -> evaluate_split's result
Score = Callable[[Any, int, str], dict[str, Any]]


def announce_stop(done: int, steps: int, path: Path | None, tracker, rank: int, *,
                  by_driver: bool) -> None:
    """Say where to resume from; a driver that passed the stop on says it itself, once."""
    if rank != 0:
        return
    if not by_driver:
        print(f"SIGTERM: stopped after step {done} of {steps}; continue with resume={path}",
              file=sys.stderr, flush=True)
    tracker.log_stop(done, path)


@dataclass
class Bookkeeping:
    """One run's end-of-step and end-of-run duties. ``checkpoint(step, name)`` writes a
    checkpoint (None where this rank writes none); ``score`` evaluates episodes of one of
    ``streams``' splits; ``label(step)`` names a step in what the bar prints."""

    cfg: Any  # metadist.config.Config: train.log_every, train.final_test, the episodes
    steps: int
    val_every: int
    checkpoint_every: int
    checkpoint: Callable[[int, str], Path | None]
    score: Score
    streams: Any  # its .val and .test episode sources
    tracker: Any
    hooks: Any
    files: Any
    bar: tqdm
    rank: int
    history: list[dict[str, float]]
    label: Callable[[int], str] = lambda done: f"step {done}"
    last_val: dict[str, Any] | None = field(default=None, init=False)

    def evaluate(self, split: str) -> dict[str, Any]:
        if split == "val":
            return self.score(self.streams.val, self.cfg.train.val_episodes,
                              self.cfg.data.val_split)
        return self.score(self.streams.test, self.cfg.eval.episodes, self.cfg.data.test_split)

    def logs(self, done: int) -> bool:
        """Whether the step that makes ``done`` steps is logged."""
        return done % self.cfg.train.log_every == 0 or done == self.steps

    def step_done(self, record: dict[str, Any], rates: dict[str, float], *,
                  stopping: bool) -> None:
        """``record`` (its "step" the steps done) is logged every ``log_every`` steps with
        the throughput ``rates``, extended with validation when it is due, and appended to
        the history. Raises ``Stopped`` after checkpointing when ``stopping``: some worker
        was asked to stop, and every worker learned it in the same all-reduce."""
        done = record["step"]
        last = done == self.steps
        if self.logs(done):
            record.update(rates)
            self.tracker.log_metrics({k: v for k, v in record.items() if k != "step"}, done)
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in record.items()
                                  if k != "step" and not k.startswith("inner_lr/")})
        validated = bool(self.val_every) and (done % self.val_every == 0 or last)
        if validated:
            val = self.last_val = self.evaluate("val")
            record["val_" + val["metric"]] = val["mean"]
            record["val_" + val["metric"] + "_ci95"] = val["ci95"]
            self.tracker.log_metrics({k: v for k, v in record.items() if k.startswith("val_")},
                                     done)
            if self.rank == 0:
                self.bar.write(f"{self.label(done)}: val {val['metric']} {val['mean']:.4f} "
                               f"± {val['ci95']:.4f}")
        self.history.append(record)
        checkpointed = bool(self.checkpoint_every) and done % self.checkpoint_every == 0
        path = self.checkpoint(done, f"step-{done:07d}.pt") if checkpointed else None
        if stopping and not checkpointed:
            path = self.checkpoint(done, f"step-{done:07d}.pt")
        # The last step is reported once, with the final checkpoint, by ``finish``; a stop
        # with the checkpoint it resumes from.
        due = (validated or checkpointed) and not last
        if self.hooks.report is not None and (due or stopping):
            self.hooks.report(record, path)
        if stopping:
            self.bar.close()
            announce_stop(done, self.steps, path, self.tracker, self.rank,
                          by_driver=self.hooks.stop is not None)
            raise Stopped(done, None if path is None else str(path))

    def finish(self, **facts: Any) -> dict[str, Any]:
        """The final checkpoint, then the meta-test (or the last validation, where
        ``final_test`` is off), with ``facts`` about the run added; written, logged and
        reported."""
        self.bar.close()
        final = self.checkpoint(self.steps, "final.pt")
        if self.cfg.train.final_test:
            result = self.evaluate("test")
        else:
            result = self.last_val or self.evaluate("val")
        result.update(run_dir=str(self.files.root),
                      checkpoint=str(self.files.root / "checkpoints" / "final.pt"), **facts)
        self.files.write_result(result, self.history)
        if self.cfg.train.final_test:
            self.tracker.log_metrics({f"test_{result['metric']}": result["mean"],
                                      f"test_{result['metric']}_ci95": result["ci95"]},
                                     self.steps)
        self.tracker.log_result(result, self.history)
        if self.hooks.report is not None:  # last: a scheduler may end this process now
            self.hooks.report(self.history[-1] if self.history else {"step": self.steps},
                              final)
        return result
