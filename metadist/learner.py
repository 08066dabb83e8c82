"""Use a meta-trained model on your own few-shot task.

    from metadist import Learner
    learner = Learner.load("runs/.../checkpoints/final.pt")
    adapted = learner.adapt(support_images, support_labels)
    adapted.predict(query_images)

Images may be file paths, encoded image files (bytes), PIL images or arrays of any size;
they are decoded, resized and normalised exactly as the training data was. Labels may be
any hashable values (class names). A model whose head is built from each support set
(prototypical networks, ``algorithm.head_init`` prototypes or zero) takes tasks with any
number of classes; one with a meta-learned head takes exactly as many as it was trained
on. Batch norm uses each batch's own statistics, as in training (transductive): predict a
task's queries together, not one image at a time.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from metadist.algorithms import MetaStep, adapt
from metadist.algorithms.heads import task_head, ways_of
from metadist.algorithms.inner_loop import Moments
from metadist.algorithms.meta import StepError
from metadist.data.episodes import Preprocessing
from metadist.data.images import load_image
from metadist.training.checkpoint import load_trained


class Learner:
    """A meta-learned initialisation plus the inner loop that adapts it to a task."""

    def __init__(self, model, params: dict[str, Tensor], preprocessing: Preprocessing | None,
                 step: MetaStep, device: torch.device, moments: Moments | None = None) -> None:
        self.model, self.params, self.preprocessing = model, params, preprocessing
        self.step, self.device = step, device
        self.moments = moments  # the inner Adam's state to start from, if the run carried one

    @classmethod
    def load(cls, checkpoint: str | Path, device: str | torch.device = "cpu", *,
             trust_code: bool | None = None) -> Learner:
        """``trust_code``: whether a model built by a ``python:`` factory may import it
        (None: the environment variable METADIST_TRUST_CODE set to 1); see
        docs/models.md."""
        trained = load_trained(checkpoint, device, trust_code=trust_code)
        step = MetaStep.from_config(trained.config.algorithm, test=True)
        pre = trained.state.get("preprocessing")
        preprocessing = Preprocessing(**pre) if pre is not None else None
        carried = trained.carried_moments(step, device)
        return cls(trained.model, trained.params, preprocessing, step, torch.device(device),
                   None if carried is None else carried.start)

    def as_module(self) -> FewShotModule:
        """The learner as an ``nn.Module`` (what MLflow's PyTorch flavour stores)."""
        return FewShotModule(self)

    @property
    def ways(self) -> int | None:
        """The number of classes a task must have; None: any (or regression)."""
        if self.preprocessing is None or self.step.any_ways:
            return None
        return getattr(self.model, "ways", None)

    def inputs(self, items) -> Tensor:
        """Images (or, for regression models, feature rows) as the model's input batch."""
        if self.preprocessing is None:
            x = torch.as_tensor(items, dtype=torch.float32)
            return (x[:, None] if x.ndim == 1 else x).to(self.device)
        if len(items) == 0:
            raise ValueError("no images given")
        pre = self.preprocessing
        images = []
        for i, item in enumerate(items):
            try:
                images.append(load_image(item, pre.channels, pre.image_size))
            except (OSError, ValueError) as err:
                raise ValueError(f"image {i} ({_describe(item)}): {err}") from None
        return pre.apply(torch.stack(images)).to(self.device)

    def adapt(self, support, labels: Sequence[Hashable], *, steps: int | None = None,
              lr: float | None = None, seed: int = 0) -> AdaptedLearner:
        """Adapt to one task. ``steps``/``lr`` override the meta-test inner loop's; ``seed``
        orders the inner minibatches where the run used them."""
        x = self.inputs(support)
        if self.preprocessing is None:  # regression: labels are target values
            classes = None
            y = torch.as_tensor(labels, dtype=torch.float32).reshape(len(x), -1).to(self.device)
        else:
            classes = list(dict.fromkeys(labels))
            if len(labels) != len(x):
                raise ValueError(f"{len(x)} support images but {len(labels)} labels")
            if self.ways is not None and len(classes) != self.ways:
                raise ValueError(
                    f"the model was meta-trained for {self.ways}-way tasks with a learned "
                    f"head, and the support set has {len(classes)} distinct labels; a model "
                    "trained with algorithm.head_init=prototypes (or zero), or a protonet, "
                    "adapts to any number of classes"
                )
            if len(classes) < 2:
                raise ValueError(f"the support set has {len(classes)} distinct label: a task "
                                 "needs at least 2 classes")
            index = {c: i for i, c in enumerate(classes)}
            y = torch.tensor([index[label] for label in labels], device=self.device)
        if lr is not None and (self.step.algorithm == "metasgd" or self.step.lslr):
            raise ValueError(f"lr={lr}: this model adapts at the inner rates it learned "
                             f"({'Meta-SGD' if self.step.algorithm == 'metasgd' else 'LSLR'})")
        # None keeps the meta-test's value; anything else is checked as a MetaStep's is.
        try:
            step = replace(self.step, inner_lr=self.step.inner_lr if lr is None else lr,
                           inner_steps=self.step.inner_steps if steps is None else steps)
        except StepError as err:
            name = {"inner_lr": "lr", "inner_steps": "steps"}.get(err.field, err.field)
            raise ValueError(f"{name}{err.detail}") from None
        adapted = adapt_to_task(self.model, self.params, step, x, y, seed, self.moments)
        return AdaptedLearner(self, adapted, classes)


class AdaptedLearner:
    """A model adapted to one task's support set."""

    def __init__(self, learner: Learner, params: dict[str, Tensor], classes: list | None):
        self.learner, self.params, self.classes = learner, params, classes

    @torch.no_grad()
    def predict_proba(self, queries) -> Tensor:
        out = self.learner.model(self.params, self.learner.inputs(queries))
        return out.softmax(-1) if self.classes is not None else out

    def predict(self, queries) -> list:
        """The predicted label of each query (regression: the predicted values)."""
        out = self.predict_proba(queries)
        if self.classes is None:
            return out.squeeze(-1).tolist()
        return [self.classes[i] for i in out.argmax(-1).tolist()]


class FewShotModule(torch.nn.Module):
    """The meta-learned initialisation and its test-time inner loop as one module:
    ``forward(support_x, support_y, query_x)`` adapts to the support set (preprocessed
    tensors, labels 0..ways-1) and returns the query logits. This is the model a sweep
    registers in MLflow; the Learner API is the friendlier way in."""

    def __init__(self, learner: Learner) -> None:
        super().__init__()
        self.model, self.step = learner.model, learner.step
        self.preprocessing = learner.preprocessing
        self.params = torch.nn.ParameterDict(
            {k.replace(".", "/"): torch.nn.Parameter(v.detach().clone())
             for k, v in learner.params.items()}
        )
        # The carried inner Adam state (if any) as buffers, so that it is saved with the
        # module: the meta-test inner loop starts from it.
        step, moments = learner.moments if learner.moments is not None else (None, {})
        self.moments_step, self.moment_keys = step, list(moments)
        for i, (m, v) in enumerate(moments.values()):
            self.register_buffer(f"adam_m_{i}", m.detach().clone())
            self.register_buffer(f"adam_v_{i}", v.detach().clone())

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        params = {k.replace("/", "."): v for k, v in self.params.items()}
        moments = None if self.moments_step is None else (self.moments_step, {
            k: (getattr(self, f"adam_m_{i}"), getattr(self, f"adam_v_{i}"))
            for i, k in enumerate(self.moment_keys)})
        adapted = adapt_to_task(self.model, params, self.step, support_x, support_y, seed=0,
                                moments=moments)
        return self.model(adapted, query_x)


def adapt_to_task(model, params: dict[str, Tensor], step: MetaStep, x: Tensor, y: Tensor,
                  seed: int, moments: Moments | None = None) -> dict[str, Tensor]:
    """The meta-test inner loop on one support set, its Adam starting from ``moments``;
    detached adapted parameters."""
    order = step.minibatches(len(x), seed, [0], x.device)
    params = {k: v.detach() for k, v in params.items()}
    with torch.enable_grad():
        params = task_head(model, params, x, y, ways_of(y) if step.any_ways else None,
                           step.head, metric=step.metric, scale=step.temperature)
        if step.algorithm == "protonet":  # the prototypes are the whole adaptation
            return {k: v.detach() for k, v in params.items()}
        options = step.adapt_options(params, model.head_keys)
        adapted = adapt(model, params, x, y, first_order=True,
                        order=None if order is None else order[0], moments=moments, **options)
    return {k: v.detach() for k, v in adapted.items()}


def _describe(item: object) -> str:
    if isinstance(item, str | Path):
        return str(item)
    return type(item).__name__
