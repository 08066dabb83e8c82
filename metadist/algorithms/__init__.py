"""Meta-learning algorithms as pure functions of (model, parameters, meta-batch)."""

from metadist.algorithms.inner_loop import adapt, task_loss
from metadist.algorithms.meta import (
    ALGORITHMS,
    CarriedMoments,
    MetaStep,
    adapted_scores,
    meta_gradient,
)

__all__ = ["ALGORITHMS", "CarriedMoments", "MetaStep", "adapt", "adapted_scores", "meta_gradient",
           "task_loss"]
