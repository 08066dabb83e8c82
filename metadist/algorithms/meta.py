"""Meta-gradients of MAML, first-order MAML, ANIL, Reptile, Meta-SGD and prototypical
networks over a meta-batch.

Every function returns sums over the meta-batch's tasks, never means: a worker that holds
a share of the batch contributes its sum, the sums are all-reduced, and the result is
divided by the global number of tasks, so an uneven split changes nothing.

Two interchangeable ways to run the tasks' inner loops:
- ``loop``: one task after another, plain autograd: the reference.
- ``vmap``: ``chunk`` tasks at a time under ``torch.func.vmap``. Second-order MAML runs
  it on the im2col ("matmul") layers: in torch 2.14 the vmap batching rules of the native
  convolution/batch-norm give wrong second-order gradients (up to ~6% off on some entries
  against float64 finite differences; the loop and the im2col layers match them, see
  tests/test_meta_gradients.py), and after the first inner
  step every task has its own weights, which vmap would turn into grouped convolutions.

Either path keeps the outer graph of ``chunk`` tasks (the loop: one) at a time, so the
memory of a meta-gradient is bounded by the chunk, and ``recompute`` bounds what one task
keeps: its inner steps are recomputed in the outer backward instead of kept
(``recompute.py``). Neither changes the sums beyond float round-off.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from metadist.algorithms.heads import HEAD_INITS, METRICS, TEMPERATURE_KEY, task_head, ways_of
from metadist.algorithms.inner_loop import (
    Model,
    Moments,
    Params,
    adapt_with_moments,
    minibatch_order,
    output_loss,
)
from metadist.algorithms.recompute import recomputed

ALGORITHMS = ("maml", "fomaml", "anil", "reptile", "metasgd", "protonet")
# Meta-SGD's learned inner learning rates live in the parameters, one tensor per model
# parameter, under this prefix: they are meta-trained, all-reduced, checkpointed and
# restored with the rest.
RATE_PREFIX = "lr."
# MAML++'s learned rates (LSLR): one per parameter tensor and inner step, [steps].
STEP_RATE_PREFIX = "lslr."
# MAML++'s per-step batch-norm weights and biases: the model's own entry serves inner
# step 0, these [steps - 1, ...] the later steps.
STEP_NORM_PREFIX = "bnstep."


def with_learned_rates(params: Params, inner_lr: float) -> Params:
    """``params`` and a learning rate per entry of each (Meta-SGD, Li et al. 2017), all
    starting at ``inner_lr``."""
    return {**params, **{RATE_PREFIX + k: torch.full_like(v, inner_lr)
                         for k, v in params.items()}}


def with_step_rates(params: Params, inner_lr: float, steps: int,
                    keys: Iterable[str] | None = None) -> Params:
    """``params`` and a learning rate per parameter tensor (of ``keys``; None: all) and
    inner step (MAML++'s LSLR, Antoniou et al. 2019), all starting at ``inner_lr``."""
    keys = params if keys is None else keys
    return {**params, **{STEP_RATE_PREFIX + k: torch.full((steps,), inner_lr,
                                                          dtype=params[k].dtype,
                                                          device=params[k].device)
                         for k in keys}}


def with_step_norms(params: Params, norm_keys: Iterable[str], steps: int) -> Params:
    """``params`` and, for each batch-norm weight and bias of ``norm_keys``, a copy per
    inner step after the first (MAML++'s per-step batch-norm weights and biases), all
    starting at the model's values."""
    return {**params, **{STEP_NORM_PREFIX + k: params[k].detach().expand(
        max(steps - 1, 0), *params[k].shape).clone() for k in norm_keys}}


def extra_shapes(shapes: dict[str, tuple[int, ...]], algorithm,
                 norm_keys: Sequence[str] = ()) -> dict[str, tuple[int, ...]]:
    """The shapes of the parameters an ``AlgorithmConfig`` adds to a model's of
    ``shapes`` (learned rates, per-step batch norm, a learned temperature): what a
    checkpoint must hold beside them. ``norm_keys``: the model's batch-norm weights and
    biases."""
    if algorithm.learn_temperature:
        return {TEMPERATURE_KEY: ()}
    if algorithm.name == "metasgd":
        return {RATE_PREFIX + k: shape for k, shape in shapes.items()}
    norms = tuple(norm_keys) if algorithm.per_step_bn else ()
    extra = {STEP_NORM_PREFIX + k: (max(algorithm.inner_steps - 1, 0), *shapes[k])
             for k in norms}
    if algorithm.lslr:
        extra.update({STEP_RATE_PREFIX + k: (algorithm.inner_steps,)
                      for k in shapes if k not in norms})
    return extra


def learned_rate_means(params: Params) -> dict[str, float]:
    """The learned rates, for the record: Meta-SGD's mean per parameter
    (``inner_lr/NAME``), LSLR's per parameter and step (``inner_lr/NAME/step-T``); and a
    learned temperature (``temperature``)."""
    out = {}
    if TEMPERATURE_KEY in params:
        out["temperature"] = params[TEMPERATURE_KEY].detach().item()
    for k, v in params.items():
        if k.startswith(RATE_PREFIX):
            out[f"inner_lr/{k[len(RATE_PREFIX):]}"] = v.detach().mean().item()
        elif k.startswith(STEP_RATE_PREFIX):
            for t, rate in enumerate(v.detach().tolist()):
                out[f"inner_lr/{k[len(STEP_RATE_PREFIX):]}/step-{t + 1}"] = rate
    return out


def multi_step_weights(steps: int, meta_step: int, anneal_steps: int) -> list[float] | None:
    """MAML++'s multi-step loss weights (Antoniou et al. 2019, their released code): the
    query loss after each of ``steps`` inner steps counts 1/steps at first; over
    ``anneal_steps`` meta-steps the earlier ones fall linearly to 0.03/steps and the last
    takes the rest; from then on the last step alone counts (None)."""
    if anneal_steps <= 0 or meta_step >= anneal_steps or steps < 2:
        return None
    early = max((1 - meta_step / anneal_steps) / steps, 0.03 / steps)
    return [early] * (steps - 1) + [1 - early * (steps - 1)]


def model_keys(params: Params) -> list[str]:
    """The model's own parameters: ``params`` less any learned rates and per-step batch
    norms."""
    return [k for k in params
            if not k.startswith((RATE_PREFIX, STEP_RATE_PREFIX, STEP_NORM_PREFIX))]


def step_norms_of(params: Params) -> Params:
    """The per-step batch-norm weights and biases in ``params``, by the model's key."""
    return {k[len(STEP_NORM_PREFIX):]: v for k, v in params.items()
            if k.startswith(STEP_NORM_PREFIX)}


class StepError(ValueError):
    """A ``MetaStep`` field with a value the algorithm cannot run."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}{detail}")
        self.field, self.detail = field, detail


@dataclass(frozen=True)
class MetaStep:
    """What one outer step needs to know about the algorithm."""

    algorithm: str = "maml"
    inner_lr: float = 0.4
    inner_steps: int = 1
    first_order: bool | None = None  # None: the algorithm's own (fomaml/reptile first order)
    inner_batch: int = 0  # support rows per inner step; 0 (or >= the support set): all
    inner_optimizer: str = "sgd"  # sgd | adam (first order only)
    inner_betas: tuple[float, float] = (0.0, 0.999)  # Adam's; β1 = 0 as in Nichol et al.
    inner_state: str = "task"  # Adam's moments: "task" (zero per task) | "carried"
    # Where each task's classifier head starts: None: the algorithm's own (protonet:
    # "prototypes", the others: "learned"); see ``metadist.algorithms.heads``.
    head_init: str | None = None
    lslr: bool = False  # MAML++: a learned rate per parameter tensor and inner step
    # MAML++: batch-norm weights and biases per inner step, meta-learned, not adapted
    per_step_bn: bool = False
    # The prototypes' metric (protonet): squared Euclidean, or cosine times temperature.
    metric: str = "euclidean"
    temperature: float = 10.0
    learn_temperature: bool = False  # a meta-learned ``TEMPERATURE_KEY`` starts at it

    def __post_init__(self) -> None:
        # The one home of these rules: a config's algorithm section is checked by building
        # its steps (``from_config``), which names the config's keys in the message.
        def bad(field: str, value, rule: str) -> StepError:
            return StepError(field, f"={value!r} {rule}")

        def choice(field: str, value, allowed: tuple) -> StepError:
            return StepError(field, f"={value!r} is not one of {list(allowed)}")

        if self.algorithm not in ALGORITHMS:
            raise choice("algorithm", self.algorithm, ALGORITHMS)
        if not self.inner_lr > 0 or not math.isfinite(self.inner_lr):
            raise bad("inner_lr", self.inner_lr, "must be a finite number > 0")
        if self.inner_steps < 1:
            raise bad("inner_steps", self.inner_steps, "must be >= 1")
        if self.inner_batch < 0:
            raise bad("inner_batch", self.inner_batch, "must be >= 0")
        if self.inner_optimizer not in ("sgd", "adam"):
            raise choice("inner_optimizer", self.inner_optimizer, ("sgd", "adam"))
        if self.algorithm == "metasgd" and self.inner_optimizer != "sgd":
            raise bad("inner_optimizer", self.inner_optimizer,
                      "does not apply: Meta-SGD's inner step is SGD at its learned rates")
        if self.inner_optimizer == "adam" and not self.is_first_order:
            # Differentiating through Adam's √v̂ is undefined where a gradient is 0.
            raise bad("inner_optimizer", "adam",
                      f"needs a first-order algorithm; {self.algorithm!r} differentiates "
                      "through the inner loop (use fomaml or reptile, or first_order=true)")
        if self.inner_state not in ("task", "carried"):
            raise choice("inner_state", self.inner_state, ("task", "carried"))
        if self.inner_state == "carried" and self.inner_optimizer != "adam":
            raise bad("inner_state", "carried",
                      "carries the inner Adam's moments and needs inner_optimizer 'adam' "
                      f"(inner_optimizer {self.inner_optimizer!r} has none)")
        if self.lslr and self.algorithm in ("metasgd", "reptile", "protonet"):
            raise bad("lslr", True, f"does not apply to {self.algorithm!r} (MAML++'s learned "
                      "rates are for maml, fomaml and anil)")
        if self.per_step_bn and self.algorithm not in ("maml", "fomaml"):
            raise bad("per_step_bn", True, f"does not apply to {self.algorithm!r} (MAML++'s "
                      "per-step batch norm is for maml and fomaml, whose inner loop adapts "
                      "the body)")
        if self.lslr and self.inner_optimizer != "sgd":
            raise bad("lslr", True, "needs inner_optimizer 'sgd': the rates are SGD's")
        if self.head_init is not None and self.head_init not in HEAD_INITS:
            raise choice("head_init", self.head_init, HEAD_INITS)
        if self.algorithm == "protonet" and self.head != "prototypes":
            raise bad("head_init", self.head_init,
                      "does not apply: a prototypical network's head is its prototypes")
        if self.head != "learned" and self.algorithm == "reptile":
            raise bad("head_init", self.head_init,
                      "needs a learned head with reptile, whose meta-gradient is θ - φ for "
                      "every parameter, the head's included")
        if self.head != "learned" and self.algorithm == "metasgd":
            raise bad("head_init", self.head_init,
                      "needs a learned head with metasgd, which learns a rate for every entry "
                      "of the head")
        if self.head != "learned" and self.inner_state == "carried":
            raise bad("inner_state", "carried", f"carries the inner Adam's moments from task "
                      f"to task, and head_init {self.head!r} gives every task a head of its own")
        if self.metric not in METRICS:
            raise choice("metric", self.metric, METRICS)
        if self.metric == "cosine" and self.algorithm != "protonet":
            raise bad("metric", "cosine", f"applies to protonet's prototypes; {self.algorithm!r} "
                      "adapts its head in an inner loop")
        if not self.temperature > 0 or not math.isfinite(self.temperature):
            raise bad("temperature", self.temperature, "must be a finite number > 0")
        if self.learn_temperature and self.metric != "cosine":
            raise bad("learn_temperature", True, f"learns the cosine prototypes' scale, and "
                      f"metric {self.metric!r} has none: set algorithm.metric=cosine")
        betas = list(self.inner_betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise bad("inner_betas", betas, "must be two values in [0, 1)")
        object.__setattr__(self, "inner_betas", tuple(float(b) for b in self.inner_betas))

    @classmethod
    def from_config(cls, algorithm, *, test: bool = False) -> MetaStep:
        """The meta-training step (``test=False``) or the validation/meta-test inner loop of
        an ``AlgorithmConfig`` (or anything with its fields). Evaluation never builds an
        outer graph, so it is always first order. A bad value raises ValueError naming the
        config key (``algorithm.test_inner_steps=0 must be >= 1``)."""
        a = algorithm
        keys = {"algorithm": "name"}
        try:
            if test:
                keys["inner_steps"] = "test_inner_steps"
                if a.test_inner_batch is not None:
                    keys["inner_batch"] = "test_inner_batch"
                batch = a.inner_batch if a.test_inner_batch is None else a.test_inner_batch
                return cls(a.name, a.inner_lr, a.test_inner_steps, True, batch,
                           a.inner_optimizer, tuple(a.inner_betas), a.inner_state, a.head_init,
                           a.lslr, a.per_step_bn, a.metric, a.temperature,
                           a.learn_temperature)
            return cls(a.name, a.inner_lr, a.inner_steps, a.first_order, a.inner_batch,
                       a.inner_optimizer, tuple(a.inner_betas), a.inner_state, a.head_init,
                       a.lslr, a.per_step_bn, a.metric, a.temperature, a.learn_temperature)
        except StepError as err:
            raise ValueError(f"algorithm.{keys.get(err.field, err.field)}{err.detail}") from None

    def minibatches(self, support_size: int, seed: int, tasks: Iterable[int],
                    device: torch.device | str | None = None) -> Tensor | None:
        """Each task's inner minibatches [T, steps, batch] on ``device`` (None: whole
        support sets). Task ``i``'s depend only on (seed, i), like its episode, so they do
        not change with how a meta-batch is split over workers or cut into evaluation
        batches."""
        if not 0 < self.inner_batch < support_size:
            return None
        orders = [minibatch_order(support_size, self.inner_batch, self.inner_steps,
                                  np.random.default_rng([seed, i])) for i in tasks]
        if not orders:
            return torch.zeros(0, self.inner_steps, self.inner_batch, dtype=torch.int64,
                               device=device)
        return torch.stack(orders).to(device)

    def adapt_options(self, params: Params | None = None, head_keys: Iterable[str] = ()
                      ) -> dict:
        """``adapt``'s keyword arguments for this step's inner loop (less ``order``):
        with ``params``, Meta-SGD's learned rates among them and the keys they adapt.
        ANIL adapts ``head_keys`` alone, at their MAML++ rates where those are learned."""
        options = {"lr": self.inner_lr, "steps": self.inner_steps,
                   "optimizer": self.inner_optimizer, "betas": self.inner_betas}
        if self.algorithm == "anil":
            keys = list(head_keys)
            options["keys"] = keys
            if self.lslr and params is not None:
                options["step_rates"] = {k: params[STEP_RATE_PREFIX + k] for k in keys}
            return options
        if self.algorithm == "metasgd" and params is not None:
            keys = model_keys(params)
            options.update(keys=keys, rates={k: params[RATE_PREFIX + k] for k in keys})
        if self.per_step_bn and params is not None:
            norms = step_norms_of(params)
            options.update(keys=[k for k in model_keys(params) if k not in norms],
                           step_norms=norms)
        if self.lslr and params is not None:
            keys = options.get("keys", model_keys(params))
            options.update(keys=keys, step_rates={k: params[STEP_RATE_PREFIX + k]
                                                  for k in keys})
        return options

    @property
    def is_first_order(self) -> bool:
        if self.algorithm == "protonet":
            return True  # no inner loop: there is no second order to take
        if self.first_order is not None:
            return self.first_order
        return self.algorithm in ("fomaml", "reptile")

    @property
    def head(self) -> str:
        """Where each task's head starts (``head_init`` resolved)."""
        if self.head_init is not None:
            return self.head_init
        return "prototypes" if self.algorithm == "protonet" else "learned"

    @property
    def any_ways(self) -> bool:
        """Whether a task may have any number of classes (its head is built per task)."""
        return self.head != "learned"


@dataclass
class CarriedMoments:
    """The inner Adam's state carried from meta-batch to meta-batch (``inner_state``
    "carried"), as in Nichol et al.'s Reptile: there one TensorFlow optimizer adapts every
    task, so its moments and step count run on through meta-training, and every
    evaluation episode starts from the state training left.

    There the tasks of a meta-batch ran one after another through that optimizer. Here
    every task of a meta-batch starts from the same state, and the state moves on to the
    mean of the tasks' end states, so the tasks stay independent (vmap, any split over
    workers). The state so advances by one task's inner steps per meta-batch, where theirs
    advanced by all the meta-batch's: with β2 = 0.999, its second moments average over
    about 1,000 / K meta-batches instead of 1,000 / (K · tasks).
    """

    step: int = 0  # inner steps taken (Adam's bias correction)
    moments: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    # Set by meta_gradient: this worker's sums of its tasks' end moments, to all-reduce.
    pending: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    @property
    def start(self) -> Moments:
        return self.step, self.moments

    def pending_tensors(self) -> list[Tensor]:
        return [t for k in sorted(self.pending) for t in self.pending[k]]

    def advance(self, sums: list[Tensor], tasks: float, steps: int) -> None:
        """Move to the mean end state of ``tasks`` tasks that took ``steps`` inner steps;
        ``sums``: every worker's ``pending_tensors()``, all-reduced."""
        it = iter(sums)
        self.moments = {k: (next(it) / tasks, next(it) / tasks) for k in sorted(self.pending)}
        self.step += steps
        self.pending = {}

    def state_dict(self) -> dict:
        return {"step": self.step,
                "moments": {k: (m.cpu(), v.cpu()) for k, (m, v) in self.moments.items()}}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.step = int(state["step"])
        self.moments = {k: (m.to(device), v.to(device)) for k, (m, v) in state["moments"].items()}


class _Head:
    """The model's head alone, for ANIL's inner loop over precomputed features."""

    def __init__(self, model: Model) -> None:
        self.model = model

    def __call__(self, params: Params, features: Tensor, impl: str = "native") -> Tensor:
        return self.model.head(params, features)


def _task_outcome(
    model: Model,
    params: Params,
    sx: Tensor,
    sy: Tensor,
    qx: Tensor,
    qy: Tensor,
    step: MetaStep,
    impl: str,
    functional: bool,
    first_order: bool,
    order: Tensor | None = None,
    moments: Moments | None = None,
    ways: int | None = None,
    step_weights: Sequence[float] | None = None,
    recompute: bool = False,
    recompute_query: bool = False,
) -> tuple[Tensor, Tensor, Params, dict[str, tuple[Tensor, Tensor]]]:
    """Adapt on the support set, starting Adam from ``moments`` (None: zero); return
    (query loss, query accuracy, adapted params, Adam's end moments). ``ways``: the task's
    classes, where its head is built from the support set. ``recompute``: the inner steps,
    and the multi-step loss's earlier query losses, are recomputed in the outer backward
    instead of kept. ``recompute_query``: the query forward passes keep each block's
    input alone and recompute the block in the outer backward (``block_remat``)."""
    params = task_head(model, params, sx, sy, ways, step.head, impl, step.metric,
                       step.temperature)
    if step.any_ways:
        # The inner loop starts from the task's head as from a value: its gradient for a
        # body parameter is the partial one. Plain autograd would also follow the head
        # back into the body (it is computed from it); torch.func.grad takes each
        # parameter as an input of its own, and the outer gradient still flows through.
        functional = True
    remat = {"remat": block_remat(functional)} if recompute_query else {}
    if step.algorithm == "protonet":  # the prototypes are the whole adaptation
        adapted, end = params, {}
        out = model(params, qx, impl, **remat)
    elif step.algorithm == "anil":
        head_keys = list(model.head_keys)
        head = _Head(model)
        s_feat = model.features(params, sx, impl)
        q_feat = model.features(params, qx, impl, **remat)
        options = step.adapt_options(params, head_keys)
        head_params, (_, end) = adapt_with_moments(
            head, {k: params[k] for k in head_keys}, s_feat, sy, first_order=first_order,
            functional=functional, order=order, moments=moments, recompute=recompute,
            **options,
        )
        out = model.head(head_params, q_feat)
        adapted = {**params, **head_params}
    else:
        trajectory = [] if step_weights is not None else None
        adapted, (_, end) = adapt_with_moments(
            model, params, sx, sy, first_order=first_order, impl=impl,
            functional=functional, order=order, moments=moments, trajectory=trajectory,
            recompute=recompute, **step.adapt_options(params),
        )
        out = model(adapted, qx, impl, **remat)
    loss = output_loss(out, qy)
    if step_weights is not None and trajectory:
        if len(step_weights) != len(trajectory):
            raise ValueError(f"{len(step_weights)} step weights for {len(trajectory)} steps")

        def query_loss(params: Params) -> Tensor:
            if recompute and not first_order:
                return _recomputed_query_loss(model, params, qx, qy, impl, functional, remat)
            return output_loss(model(params, qx, impl, **remat), qy)

        loss = sum(w * query_loss(p)
                   for w, p in zip(step_weights[:-1], trajectory[:-1])) + step_weights[-1] * loss
    if qy.dtype == torch.int64:
        acc = (out.argmax(-1) == qy).float().mean()
    else:
        acc = torch.zeros((), dtype=out.dtype, device=out.device)
    return loss, acc, adapted, end


def block_remat(functional: bool) -> Callable[..., Tensor]:
    """A model's ``remat`` (``metadist.models.layers.Remat``) that makes each block (or
    unit of a block) one ``recomputed`` node: the forward keeps its inputs alone, and the
    outer backward runs it again to differentiate it. A query forward so keeps one block's
    graph at a time instead of the whole network's; the gradient is the same (the blocks
    are deterministic: batch norm takes the batch's statistics, and nothing random runs in
    meta-training)."""
    def remat(block: Callable[..., Tensor], h: Tensor, *weights: Tensor) -> Tensor:
        def fn(*inputs: Tensor, create_graph: bool) -> tuple[Tensor]:
            return (block(*inputs),)
        return recomputed(fn, h, *weights, functional=functional)[0]
    return remat


def _recomputed_query_loss(model: Model, params: Params, qx: Tensor, qy: Tensor,
                           impl: str, functional: bool, remat: dict) -> Tensor:
    """The query loss at ``params``, keeping only its inputs for the outer backward (the
    multi-step loss's query losses after the earlier inner steps); ``remat``: its
    recomputation recomputes block by block in turn."""
    names = list(params)

    def loss(qx: Tensor, qy: Tensor, *values: Tensor, create_graph: bool) -> tuple[Tensor]:
        return (output_loss(model(dict(zip(names, values)), qx, impl, **remat), qy),)

    return recomputed(loss, qx, qy, *params.values(), functional=functional)[0]


def meta_gradient(
    model: Model,
    params: Params,
    batch,
    step: MetaStep,
    *,
    inner_loop: str = "loop",
    chunk: int = 0,
    order: Tensor | None = None,
    carried: CarriedMoments | None = None,
    step_weights: Sequence[float] | None = None,
    recompute: bool = False,
    recompute_query: bool = False,
) -> tuple[Params, dict[str, float]]:
    """Sum over the batch's tasks of each task's meta-gradient, and summed metrics.
    ``step_weights``: MAML++'s multi-step loss, the query loss after each inner step
    weighted (``multi_step_weights``); None: the query loss after the last step.
    ``chunk``: vmap's tasks per call (0: all), each chunk's outer graph built, summed and
    freed before the next; the loop takes one task at a time. ``recompute``: second-order
    inner steps are recomputed in the outer backward instead of kept (``recompute.py``);
    ``recompute_query``: so are the query forward passes' blocks (``block_remat``).

    MAML/FOMAML/ANIL: the gradient of the query loss after adaptation. Reptile: θ - φ,
    so that an SGD outer step of rate β moves θ by β(φ - θ). ``order``: each task's inner
    minibatches (``MetaStep.minibatches``); None with ``step.inner_batch`` set draws them
    from torch's global generator. ``carried``: the inner Adam starts every task from its
    state, and ``carried.pending`` gets the sums of the tasks' end moments (the caller
    all-reduces them and calls ``carried.advance``).
    """
    order = _orders(step, batch, order)
    names = list(params)
    leaves = [params[k] for k in names]
    total = [torch.zeros_like(p) for p in leaves]
    # On the batch's device: an in-place add of a CUDA tensor to a CPU one fails.
    loss_sum = torch.zeros((), device=batch.support_x.device)
    acc_sum = torch.zeros((), device=batch.support_x.device)
    ends = _zero_moments(model, params, step) if carried is not None else {}
    start = None if carried is None else carried.start
    reptile = step.algorithm == "reptile"
    for lo, hi in _chunks(batch.support_x.shape[0], 1 if inner_loop == "loop" else chunk):
        sx, sy = batch.support_x[lo:hi], batch.support_y[lo:hi]
        qx, qy = batch.query_x[lo:hi], batch.query_y[lo:hi]
        o = None if order is None else order[lo:hi]
        if reptile:
            losses, accs, adapted, end = _run_tasks(
                model, params, sx, sy, qx, qy, step, inner_loop, outer_graph=False, order=o,
                moments=start,
            )
            for i, k in enumerate(names):
                total[i] += (params[k].detach() - adapted[k]).sum(0)
        else:
            losses, accs, _, end = _run_tasks(
                model, params, sx, sy, qx, qy, step, inner_loop, outer_graph=True, order=o,
                moments=start, step_weights=step_weights, recompute=recompute,
                recompute_query=recompute_query,
            )
            grads = torch.autograd.grad(losses.sum(), leaves, allow_unused=True)
            for i, g in enumerate(grads):
                if g is not None:
                    total[i] += g
        for k in ends:
            ends[k] = (ends[k][0] + end[k][0].detach().sum(0),
                       ends[k][1] + end[k][1].detach().sum(0))
        loss_sum += losses.detach().sum()
        acc_sum += accs.detach().sum()
    if carried is not None:
        carried.pending = ends
    metrics = {"loss": loss_sum.item(), "accuracy": acc_sum.item()}
    return dict(zip(names, total)), metrics


def _zero_moments(model: Model, params: Params, step: MetaStep
                  ) -> dict[str, tuple[Tensor, Tensor]]:
    """Zero sums of the end moments of every parameter the inner Adam adapts (a worker
    with no tasks still all-reduces them)."""
    if step.inner_optimizer != "adam":
        return {}
    keys = model.head_keys if step.algorithm == "anil" else params
    return {k: (torch.zeros_like(params[k]).detach(), torch.zeros_like(params[k]).detach())
            for k in keys}


def adapted_scores(
    model: Model,
    params: Params,
    batch,
    step: MetaStep,
    *,
    inner_loop: str = "loop",
    chunk: int = 0,
    order: Tensor | None = None,
    carried: CarriedMoments | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-task query (loss, accuracy) after adapting on each support set; no outer graph.
    ``carried``: every task's inner Adam starts from its state, which stays as it is."""
    params = {k: v.detach() for k, v in params.items()}
    order = _orders(step, batch, order)
    losses, accs = [], []
    for lo, hi in _chunks(batch.support_x.shape[0], 1 if inner_loop == "loop" else chunk):
        loss, acc, _, _ = _run_tasks(
            model, params, batch.support_x[lo:hi], batch.support_y[lo:hi],
            batch.query_x[lo:hi], batch.query_y[lo:hi], step, inner_loop,
            outer_graph=False, order=None if order is None else order[lo:hi],
            moments=None if carried is None else carried.start,
        )
        losses.append(loss.detach())
        accs.append(acc.detach())
    return torch.cat(losses), torch.cat(accs)


def _run_tasks(
    model: Model,
    params: Params,
    sx: Tensor,
    sy: Tensor,
    qx: Tensor,
    qy: Tensor,
    step: MetaStep,
    inner_loop: str,
    outer_graph: bool,
    order: Tensor | None = None,
    moments: Moments | None = None,
    step_weights: Sequence[float] | None = None,
    recompute: bool = False,
    recompute_query: bool = False,
) -> tuple[Tensor, Tensor, Params, dict[str, tuple[Tensor, Tensor]]]:
    """Per-task (loss [T], accuracy [T], adapted params [T, ...], Adam's end moments
    [T, ...]) for a slice of tasks, each starting Adam from ``moments``."""
    first_order = step.is_first_order or not outer_graph
    impl = "matmul" if inner_loop == "vmap" and not first_order else "native"
    ways = ways_of(sy) if step.any_ways and sy.numel() else None
    if not outer_graph:
        params = {k: v.detach() for k, v in params.items()}
    if inner_loop == "loop":
        results = []
        with torch.enable_grad():
            for t in range(sx.shape[0]):
                loss, acc, adapted, end = _task_outcome(
                    model, params, sx[t], sy[t], qx[t], qy[t], step, impl, False, first_order,
                    None if order is None else order[t], moments, ways, step_weights, recompute,
                    recompute_query and outer_graph,
                )
                if not outer_graph:
                    loss, acc = loss.detach(), acc.detach()
                    adapted = {k: v.detach() for k, v in adapted.items()}
                results.append((loss, acc, adapted, end))
        losses = torch.stack([r[0] for r in results])
        accs = torch.stack([r[1] for r in results])
        adapted = {k: torch.stack([r[2][k] for r in results]) for k in params}
        ends = {k: tuple(torch.stack([r[3][k][i] for r in results]) for i in range(2))
                for k in results[0][3]} if results else {}
        return losses, accs, adapted, ends
    if inner_loop != "vmap":
        raise ValueError(f"inner_loop must be 'loop' or 'vmap', got {inner_loop!r}")

    def one_task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, order: Tensor | None
                 ) -> tuple[Tensor, Tensor, Params, dict[str, tuple[Tensor, Tensor]]]:
        return _task_outcome(model, params, sx, sy, qx, qy, step, impl, True, first_order,
                             order, moments, ways, step_weights, recompute,
                             recompute_query and outer_graph)

    grad_mode: Callable = torch.enable_grad if outer_graph else torch.no_grad
    in_dims = (0, 0, 0, 0, None if order is None else 0)
    with grad_mode():
        return torch.func.vmap(one_task, in_dims, randomness="error")(sx, sy, qx, qy, order)


def _orders(step: MetaStep, batch, order: Tensor | None) -> Tensor | None:
    if order is not None or not 0 < step.inner_batch < batch.support_x.shape[1]:
        return order
    seed = int(torch.randint(2**31, ()).item())
    return step.minibatches(batch.support_x.shape[1], seed, range(batch.support_x.shape[0]),
                            batch.support_x.device)


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    size = n if size <= 0 else size
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]
