"""Meta-learning algorithms as pure functions of (model, parameters, meta-batch)."""

from metadist.algorithms.heads import TEMPERATURE_KEY
from metadist.algorithms.inner_loop import adapt, task_loss
from metadist.algorithms.meta import (
    ALGORITHMS,
    CarriedMoments,
    MetaStep,
    adapted_scores,
    learned_rate_means,
    meta_gradient,
    model_keys,
    multi_step_weights,
    with_learned_rates,
    with_step_norms,
    with_step_rates,
)

__all__ = ["ALGORITHMS", "TEMPERATURE_KEY", "CarriedMoments", "MetaStep", "adapt",
           "adapted_scores", "meta_gradient", "learned_rate_means", "model_keys",
           "multi_step_weights", "task_loss",
           "with_learned_rates", "with_step_norms", "with_step_rates"]
