"""metadist: meta-training of few-shot learners at scale (PyTorch, Ray, MLflow)."""

__version__ = "0.1.0"
__all__ = ["Learner"]


def __getattr__(name: str):
    # Lazy, so that `metadist --help` and the data tools do not pay for the model stack.
    if name == "Learner":
        from metadist.learner import Learner

        return Learner
    raise AttributeError(f"module 'metadist' has no attribute {name!r}")
