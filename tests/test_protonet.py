"""Prototypical networks and heads built per task (Proto-MAML, zero heads): the loss
against Snell et al.'s written out, meta-gradients against float64 finite differences,
both inner-loop paths, the config's rules, one and two workers, resume, and a 5-way
model adapting to 20-way tasks of real Omniglot characters through the Learner."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_workers
from test_meta_gradients import image_batch, small_conv

from metadist import Learner
from metadist.algorithms import MetaStep, adapted_scores, meta_gradient
from metadist.algorithms.heads import TEMPERATURE_KEY, prototype_head, prototypes, task_head
from metadist.config import ConfigError, load_config
from metadist.data import ClassStore, EpisodeSampler
from metadist.data.episodes import MetaBatch
from metadist.training.checkpoint import load_checkpoint
from metadist.training.evaluate import evaluate_checkpoint
from metadist.training.loop import train

ROOT = Path(__file__).resolve().parents[1]


def snell_loss(model, params, batch, t: int, ways: int) -> torch.Tensor:
    """Snell et al.'s episode loss, written out: softmax over negative squared Euclidean
    distances to the class means of the support embeddings."""
    zs = model.features(params, batch.support_x[t])
    zq = model.features(params, batch.query_x[t])
    means = torch.stack([zs[batch.support_y[t] == k].mean(0) for k in range(ways)])
    distances = ((zq[:, None, :] - means[None]) ** 2).sum(-1)
    return F.cross_entropy(-distances, batch.query_y[t])


def test_the_prototype_head_scores_like_negative_squared_distances():
    g = torch.Generator().manual_seed(0)
    features, labels = torch.randn(12, 8, generator=g), torch.arange(4).repeat(3)
    queries = torch.randn(7, 8, generator=g)
    head = prototype_head(features, labels, 4)
    logits = queries @ head["head.weight"].t() + head["head.bias"]
    c = prototypes(features, labels, 4)
    torch.testing.assert_close(c[1], features[labels == 1].mean(0))
    distances = torch.cdist(queries, c) ** 2
    # Equal up to |z|², the same for every class: the same softmax.
    torch.testing.assert_close(logits.softmax(-1), (-distances).softmax(-1))


@pytest.mark.parametrize("inner_loop", ["loop", "vmap"])
def test_protonet_loss_and_meta_gradient_are_snell_et_al_s(inner_loop):
    model, params = small_conv(dtype=torch.float64, ways=5)  # a head of 5: unused
    batch = image_batch(tasks=2, ways=3, shots=2, queries=2, dtype=torch.float64)
    grads, metrics = meta_gradient(model, params, batch, MetaStep("protonet"),
                                   inner_loop=inner_loop)
    reference = sum(snell_loss(model, params, batch, t, 3) for t in range(2))
    assert metrics["loss"] == pytest.approx(reference.item(), rel=1e-6)  # summed in fp32
    expected = torch.autograd.grad(reference, list(params.values()), allow_unused=True)
    for (k, got), want in zip(grads.items(), expected):
        if want is None:  # the meta-learned head: a protonet has none
            assert k.startswith("head.") and not got.any()
        else:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def cosine_scores(model, p, batch, t, scale):
    """Task t's query scores under cosine prototypes, written out (Chen et al.'s metric)."""
    zs = model.features(p, batch.support_x[t])
    zq = F.normalize(model.features(p, batch.query_x[t]), dim=-1)
    means = torch.stack([zs[batch.support_y[t] == k].mean(0) for k in range(3)])
    return scale * zq @ F.normalize(means, dim=-1).t()


def assert_written_out_meta_gradient(grads, metrics, params, scores, batch):
    """``meta_gradient``'s loss and gradients are those of ``scores(params, t)``'s loss."""
    reference = sum(F.cross_entropy(scores(params, t), batch.query_y[t]) for t in range(2))
    assert metrics["loss"] == pytest.approx(reference.item(), rel=1e-6)
    expected = torch.autograd.grad(reference, list(params.values()), allow_unused=True)
    for got, want in zip(grads.values(), expected):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("inner_loop", ["loop", "vmap"])
def test_cosine_prototypes_score_temperature_times_the_cosine_similarity(inner_loop):
    # Chen et al.'s Classifier-Baseline / Meta-Baseline metric, written out.
    model, params = small_conv(dtype=torch.float64, ways=5)
    batch = image_batch(tasks=2, ways=3, shots=2, queries=2, dtype=torch.float64)
    step = MetaStep("protonet", metric="cosine", temperature=7.0)

    def written_out(p, t):
        return cosine_scores(model, p, batch, t, 7.0)

    head = task_head(model, params, batch.support_x[0], batch.support_y[0], 3, step.head,
                     metric=step.metric, scale=step.temperature)
    torch.testing.assert_close(model(head, batch.query_x[0]), written_out(params, 0))
    grads, metrics = meta_gradient(model, params, batch, step, inner_loop=inner_loop)
    assert_written_out_meta_gradient(grads, metrics, params, written_out, batch)
    # Not the Euclidean head's scores: the metric is really switched.
    euclidean, _ = meta_gradient(model, params, batch, MetaStep("protonet"))
    assert euclidean["conv0.weight"].sub(grads["conv0.weight"]).abs().max() > 1e-6


@pytest.mark.parametrize("inner_loop", ["loop", "vmap"])
def test_a_learned_temperature_scales_the_cosine_prototypes_and_gets_its_gradient(inner_loop):
    # Meta-Baseline: the scale is a parameter, the gradient of the loss written out.
    model, params = small_conv(dtype=torch.float64, ways=5)
    params = {**params, TEMPERATURE_KEY: torch.tensor(4.0, dtype=torch.float64,
                                                      requires_grad=True)}
    batch = image_batch(tasks=2, ways=3, shots=2, queries=2, dtype=torch.float64)
    step = MetaStep("protonet", metric="cosine", temperature=10.0, learn_temperature=True)

    def written_out(p, t):
        return cosine_scores(model, p, batch, t, p[TEMPERATURE_KEY])

    grads, metrics = meta_gradient(model, params, batch, step, inner_loop=inner_loop)
    assert_written_out_meta_gradient(grads, metrics, params, written_out, batch)
    assert grads[TEMPERATURE_KEY].abs() > 1e-6  # the temperature is reached
    # The parameter, not algorithm.temperature (10), scales the scores.
    head = task_head(model, params, batch.support_x[0], batch.support_y[0], 3, step.head,
                     metric="cosine", scale=10.0)
    assert head["head.scale"] is params[TEMPERATURE_KEY]


def test_a_learned_temperature_trains_checkpoints_resumes_and_is_reported(tmp_path,
                                                                          omniglot_small):
    learned = ["algorithm.metric=cosine", "algorithm.learn_temperature=true",
               "algorithm.temperature=5", "train.checkpoint_every=2"]
    whole = train(protonet_config(omniglot_small, tmp_path / "a", "train.steps=4", *learned))
    a = load_checkpoint(whole["checkpoint"])
    first = load_checkpoint(Path(whole["run_dir"]) / "checkpoints" / "step-0000002.pt")
    assert first["params"][TEMPERATURE_KEY].item() != 5.0  # it moved from its start
    assert a["params"][TEMPERATURE_KEY].item() != first["params"][TEMPERATURE_KEY].item()
    value = a["params"][TEMPERATURE_KEY].item()
    assert whole["head"] == f"prototypes (cosine, learned temperature {value:.4g})"
    history = [h for h in a["history"] if "temperature" in h]
    assert history and history[-1]["temperature"] == pytest.approx(value)
    resumed = train(protonet_config(omniglot_small, tmp_path / "b", "train.steps=4", *learned),
                    resume=Path(whole["run_dir"]) / "checkpoints" / "step-0000002.pt")
    b = load_checkpoint(resumed["checkpoint"])
    for k in a["params"]:
        torch.testing.assert_close(b["params"][k], a["params"][k], rtol=0, atol=0)
    # The Learner and `metadist eval` score with the learned value.
    learner = Learner.load(whole["checkpoint"])
    assert learner.params[TEMPERATURE_KEY].item() == value
    again = evaluate_checkpoint(whole["checkpoint"], episodes=20)
    assert again["mean"] == whole["mean"] and again["head"] == whole["head"]
    euclidean = evaluate_checkpoint(whole["checkpoint"], episodes=20, metric="euclidean")
    assert euclidean["head"] == "prototypes"


@pytest.mark.parametrize("head_init", ["prototypes", "zero"])
def test_a_head_built_per_task_gets_the_meta_gradient_of_finite_differences(head_init):
    # Proto-MAML: the outer gradient flows through the prototypes into the body.
    model, params = small_conv(dtype=torch.float64, ways=3)
    batch = image_batch(tasks=2, ways=4, dtype=torch.float64)  # 4-way tasks, 3-way model
    step = MetaStep("maml", inner_lr=0.3, inner_steps=2, head_init=head_init)
    grads, _ = meta_gradient(model, params, batch, step, inner_loop="loop")
    vmapped, _ = meta_gradient(model, params, batch, step, inner_loop="vmap")

    def objective(p):
        losses, _ = adapted_scores_with_graph(model, p, batch, step)
        return losses

    g = torch.Generator().manual_seed(3)
    body = [k for k in params if not k.startswith("head.")]
    for k in body[:3]:
        direction = torch.randn(params[k].shape, generator=g, dtype=torch.float64)
        eps = 1e-6
        plus = {**params, k: params[k] + eps * direction}
        minus = {**params, k: params[k] - eps * direction}
        numeric = (objective(plus) - objective(minus)) / (2 * eps)
        assert (grads[k] * direction).sum().item() == pytest.approx(numeric.item(), rel=1e-5)
        torch.testing.assert_close(vmapped[k], grads[k], rtol=1e-6, atol=1e-9)
    assert not grads["head.weight"].any()  # replaced in every task


def adapted_scores_with_graph(model, params, batch, step):
    from metadist.algorithms.meta import _run_tasks

    with torch.no_grad():
        losses, accs, _, _ = _run_tasks(model, params, batch.support_x, batch.support_y,
                                        batch.query_x, batch.query_y, step, "loop",
                                        outer_graph=False)
    return losses.sum(), accs


def test_evaluation_scores_a_protonet_on_both_paths():
    model, params = small_conv(ways=5)
    batch = image_batch(tasks=3, ways=3, shots=2, queries=2)
    loop = adapted_scores(model, params, batch, MetaStep("protonet"), inner_loop="loop")
    vmap = adapted_scores(model, params, batch, MetaStep("protonet"), inner_loop="vmap")
    for a, b in zip(loop, vmap):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("overrides, message", [
    (["algorithm.name=protonet"],
     "algorithm.name='protonet' builds each task's head from its classes, and "
     "data.dataset='sinusoid' is regression"),
    (["algorithm.name=protonet", "algorithm.head_init=zero", "data.dataset=/x"],
     "algorithm.head_init='zero' does not apply: a prototypical network's head is its "
     "prototypes"),
    (["algorithm.head_init=prototypes", "algorithm.name=reptile", "data.dataset=/x"],
     "algorithm.head_init='prototypes' needs a learned head with reptile"),
    (["algorithm.head_init=proto", "data.dataset=/x"],
     "algorithm.head_init='proto' is not one of ['learned', 'prototypes', 'zero']"),
    (["data.train_ways=10", "data.dataset=/x"],
     "data.train_ways=10 differs from data.ways=5, and algorithm.name='maml' meta-learns a "
     "head of data.ways outputs"),
    (["data.train_ways=0", "data.dataset=/x"], "data.train_ways=0 must be >= 1"),
    (["algorithm.metric=cosine", "data.dataset=/x"],
     "algorithm.metric='cosine' applies to protonet's prototypes; 'maml' adapts its head"),
    (["algorithm.metric=manhattan", "algorithm.name=protonet", "data.dataset=/x"],
     "algorithm.metric='manhattan' is not one of ['euclidean', 'cosine']"),
    (["algorithm.temperature=0", "algorithm.name=protonet", "data.dataset=/x"],
     "algorithm.temperature=0.0 must be a finite number > 0"),
    (["algorithm.learn_temperature=true", "algorithm.name=protonet", "data.dataset=/x"],
     "algorithm.learn_temperature=True learns the cosine prototypes' scale, and metric "
     "'euclidean' has none: set algorithm.metric=cosine"),
])
def test_the_config_refuses_heads_that_cannot_work(overrides, message):
    base = ["model.name=conv4"] if "data.dataset=/x" in overrides else []
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "sinusoid_maml.yaml", [*base, *overrides])
    assert message in str(err.value)


def protonet_config(omniglot_small, out, *extra):
    return load_config(ROOT / "configs" / "omniglot_5w1s_protonet.yaml", [
        f"data.dataset={omniglot_small}", f"train.output_dir={out}", "data.train_ways=10",
        "train.val_every=0", "eval.episodes=20", "train.progress=false",
        "tracking.enabled=false", "train.inner_loop=loop", "train.threads=1", *extra])


def test_protonet_resumes_bit_for_bit_and_two_workers_match_one(tmp_path, omniglot_small):
    sgd = ["algorithm.outer_optimizer=sgd", "algorithm.outer_lr=0.01",
           "algorithm.meta_batch_size=3", "train.checkpoint_every=2"]
    whole = train(protonet_config(omniglot_small, tmp_path / "a", "train.steps=4", *sgd))
    half = Path(whole["run_dir"]) / "checkpoints" / "step-0000002.pt"
    resumed = train(protonet_config(omniglot_small, tmp_path / "b", "train.steps=4", *sgd),
                    resume=half)
    a, b = load_checkpoint(whole["checkpoint"]), load_checkpoint(resumed["checkpoint"])
    for k in a["params"]:
        torch.testing.assert_close(a["params"][k], b["params"][k], rtol=0, atol=0)
    assert resumed["mean"] == whole["mean"]
    overrides = [f"data.dataset={omniglot_small}", "data.train_ways=10", "train.steps=4",
                 "train.val_every=0", "eval.episodes=20", "tracking.enabled=false",
                 "train.progress=false", "train.inner_loop=loop", "train.threads=1", *sgd]
    two = run_workers(2, ["configs/omniglot_5w1s_protonet.yaml", *overrides], tmp_path / "two")
    c = load_checkpoint(Path(two["run_dir"]) / "checkpoints" / "final.pt")
    for k in a["params"]:
        torch.testing.assert_close(c["params"][k], a["params"][k], rtol=1e-4, atol=1e-5)
    assert two["mean"] == pytest.approx(whole["mean"], rel=1e-4)


def test_a_5_way_protonet_adapts_to_20_way_tasks_of_real_characters(tmp_path, omniglot_small):
    result = train(protonet_config(omniglot_small, tmp_path, "train.steps=150",
                                   "data.train_ways=5"))
    learner = Learner.load(result["checkpoint"])
    assert learner.ways is None  # any number of classes
    store = ClassStore(omniglot_small / "test", image_size=28, channels=1)
    sampler = EpisodeSampler(store, ways=20, shots=1, queries=5, seed=4,
                             preprocessing=learner.preprocessing)

    def accuracy(learner: Learner) -> float:
        accuracies = []
        for episode in range(5):
            plan = sampler.plan(episode)
            support, labels, queries, truth = [], [], [], []
            for cls, examples in zip(plan.classes, plan.examples):
                arrays = [img[0].numpy() for img in store.load_examples(int(cls), examples)]
                name = f"character-{int(cls)}"
                support.append(arrays[0])
                labels.append(name)
                queries += arrays[1:]
                truth += [name] * 5
            predicted = learner.adapt(support, labels).predict(queries)
            accuracies.append(np.mean([p == t for p, t in zip(predicted, truth)]))
            # The same episode through the evaluation path scores the same.
            batch = MetaBatch(*(t[None] for t in sampler.episode(episode)))
            _, acc = adapted_scores(learner.model, learner.params, batch, learner.step)
            assert accuracies[-1] == pytest.approx(acc.item())
        return float(np.mean(accuracies))

    initial = Learner(learner.model, learner.model.init_params(torch.Generator().manual_seed(0)),
                      learner.preprocessing, learner.step, learner.device)
    trained, untrained = accuracy(learner), accuracy(initial)
    # Cosine prototypes through the Learner: the same answers as the evaluation path.
    cosine_learner = Learner(learner.model, learner.params, learner.preprocessing,
                             replace(learner.step, metric="cosine"), learner.device)
    assert accuracy(cosine_learner) > 0.5
    # `metadist eval --ways 20` meta-tests the 5-way model on 20-way episodes.
    twenty = evaluate_checkpoint(result["checkpoint"], ways=20, episodes=10)
    assert (twenty["ways"], twenty["episodes"]) == (20, 10) and twenty["mean"] > 0.5
    # `metadist eval --metric cosine`: the same backbone with cosine prototypes.
    cosine = evaluate_checkpoint(result["checkpoint"], ways=20, episodes=10, metric="cosine")
    assert cosine["head"] == "prototypes (cosine, temperature 10)" and cosine["mean"] > 0.5
    assert cosine["mean"] != twenty["mean"] or cosine["loss"] != twenty["loss"]
    print(f"20-way accuracy of a 5-way protonet: {trained:.3f} ({untrained:.3f} untrained)")
    # Chance is 0.05; the prototypes of random features already sort some characters.
    # Meta-training must add to that by a margin a broken head could not.
    assert trained > 0.5 and trained > untrained + 0.15, (trained, untrained)


def test_a_model_with_a_learned_head_says_it_cannot_take_other_ways(tmp_path, omniglot_small):
    config = load_config(ROOT / "configs" / "omniglot_5w1s_maml.yaml", [
        f"data.dataset={omniglot_small}", f"train.output_dir={tmp_path}", "train.steps=1",
        "algorithm.meta_batch_size=1", "train.val_every=0", "eval.episodes=2",
        "train.progress=false", "tracking.enabled=false", "train.inner_loop=loop"])
    learner_path = train(config)["checkpoint"]
    learner = Learner.load(learner_path)
    assert learner.ways == 5
    images = [np.zeros((28, 28), np.uint8)] * 3
    with pytest.raises(ValueError, match="meta-trained for 5-way tasks with a learned head, "
                       "and the support set has 3 distinct labels; .*head_init=prototypes"):
        learner.adapt(images, ["a", "b", "c"])
    with pytest.raises(ValueError, match="ways=20: .* has a meta-learned head of 5 classes"):
        evaluate_checkpoint(learner_path, ways=20, episodes=2)
