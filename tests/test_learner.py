"""The Learner API: load a checkpoint, adapt to a user's own few-shot task, predict."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from metadist import Learner
from metadist.algorithms import adapted_scores
from metadist.config import load_config
from metadist.data import ClassStore, EpisodeSampler, Manifest, Preprocessing
from metadist.data.episodes import MetaBatch
from metadist.training.loop import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(omniglot_small, tmp_path_factory) -> str:
    cfg = load_config(ROOT / "configs" / "omniglot_5w1s_maml.yaml", [
        f"data.dataset={omniglot_small}", f"train.output_dir={tmp_path_factory.mktemp('r')}",
        "train.steps=2", "algorithm.meta_batch_size=2", "train.val_every=0",
        "eval.episodes=5", "train.progress=false", "tracking.enabled=false",
        "train.inner_loop=loop",
    ])
    return train(cfg)["checkpoint"]


def test_files_are_preprocessed_exactly_like_the_training_data(checkpoint, omniglot_small,
                                                                tmp_path):
    store = ClassStore(omniglot_small / "test", image_size=28, channels=1)
    pre = Preprocessing.from_manifest(Manifest.load(omniglot_small / "test" / "manifest.json"))
    entry = Manifest.load(omniglot_small / "test" / "manifest.json").classes[0]
    rows = pq.ParquetFile(omniglot_small / "test" / entry.shard).read_row_group(
        entry.row_group, columns=["image"]).column("image").to_pylist()
    files = []
    for j in range(3):
        files.append(tmp_path / f"{j}.png")
        files[-1].write_bytes(rows[j]["bytes"])
    learner = Learner.load(checkpoint)
    expected = pre.apply(store.load_class(0)[:3])
    torch.testing.assert_close(learner.inputs([str(f) for f in files]), expected)


def test_adapt_and_predict_match_the_evaluation_path(checkpoint, omniglot_small):
    learner = Learner.load(checkpoint)
    store = ClassStore(omniglot_small / "test", image_size=28, channels=1)
    sampler = EpisodeSampler(store, ways=5, shots=1, queries=3, seed=4,
                             preprocessing=learner.preprocessing)
    plan = sampler.plan(0)
    names = ["alpha", "beta", "gamma", "delta", "eps"]
    support, support_labels, query, query_labels = [], [], [], []
    for label, (cls, examples) in enumerate(zip(plan.classes, plan.examples)):
        images = store.load_examples(int(cls), examples)  # uint8 [K+Q, 1, 28, 28]
        arrays = [img[0].numpy() for img in images]  # what a user might hold: HxW arrays
        support += arrays[:1]
        support_labels += [names[label]]
        query += arrays[1:]
        query_labels += [names[label]] * 3
    adapted = learner.adapt(support, support_labels)
    predicted = adapted.predict(query)
    assert set(predicted) <= set(names)
    user_accuracy = np.mean([p == t for p, t in zip(predicted, query_labels)])

    episode = sampler.episode(0)
    batch = MetaBatch(*(t[None] for t in episode))
    _, acc = adapted_scores(learner.model, learner.params, batch, learner.step)
    assert user_accuracy == pytest.approx(acc.item())
    proba = adapted.predict_proba(query)
    assert proba.shape == (15, 5)
    torch.testing.assert_close(proba.sum(-1), torch.ones(15))


def test_a_carried_inner_adam_state_travels_with_the_learner(omniglot_small, tmp_path):
    from metadist.algorithms import CarriedMoments
    from metadist.learner import adapt_to_task

    cfg = load_config(ROOT / "configs" / "omniglot_5w1s_reptile.yaml", [
        f"data.dataset={omniglot_small}", f"train.output_dir={tmp_path}", "train.steps=2",
        "data.train_shots=4", "algorithm.meta_batch_size=2", "algorithm.test_inner_steps=4",
        "algorithm.inner_state=carried", "train.val_every=0", "eval.episodes=4",
        "train.progress=false", "tracking.enabled=false", "train.inner_loop=loop",
    ])
    learner = Learner.load(train(cfg)["checkpoint"])
    assert learner.moments is not None and learner.moments[0] == 2 * 5  # steps x inner steps
    store = ClassStore(omniglot_small / "test", image_size=28, channels=1)
    episode = EpisodeSampler(store, ways=5, shots=1, queries=3, seed=4,
                             preprocessing=learner.preprocessing).episode(0)
    sx, sy, qx, qy = episode
    module = learner.as_module()
    torch.save(module, tmp_path / "module.pt")  # how MLflow's PyTorch flavour stores it
    restored = torch.load(tmp_path / "module.pt", weights_only=False)
    with torch.no_grad():
        logits = restored(sx, sy, qx)
    _, acc = adapted_scores(learner.model, learner.params, MetaBatch(*(t[None] for t in episode)),
                            learner.step, carried=CarriedMoments(*learner.moments))
    assert (logits.argmax(-1) == qy).float().mean().item() == pytest.approx(acc.item())
    # Learner.adapt's inner loop, after it has preprocessed the user's images:
    adapted = adapt_to_task(learner.model, learner.params, learner.step, sx, sy, 0,
                            learner.moments)
    torch.testing.assert_close(learner.model(adapted, qx), logits)
    fresh = adapt_to_task(learner.model, learner.params, learner.step, sx, sy, 0)
    assert not torch.allclose(learner.model(fresh, qx), logits)


def test_any_image_size_and_type(checkpoint, tmp_path):
    learner = Learner.load(checkpoint)
    rng = np.random.default_rng(0)
    support = [
        Image.fromarray(rng.integers(0, 255, (105, 105), dtype=np.uint8)),
        rng.integers(0, 255, (50, 60), dtype=np.uint8),
        rng.random((28, 28)),  # floats in [0, 1]
        rng.integers(0, 255, (40, 40, 3), dtype=np.uint8),  # colour: converted to grey
        torch.rand(1, 33, 33),
    ]
    path = tmp_path / "x.jpg"
    Image.fromarray(rng.integers(0, 255, (70, 70, 3), dtype=np.uint8)).save(path)
    adapted = learner.adapt(support, [0, 1, 2, 3, 4])
    assert all(p in range(5) for p in adapted.predict([str(path), support[0]]))


def test_bad_input_is_named(checkpoint, tmp_path):
    learner = Learner.load(checkpoint)
    images = [np.zeros((28, 28), dtype=np.uint8)] * 5
    with pytest.raises(ValueError, match="5-way tasks with a learned head, and the support "
                       "set has 3 distinct labels"):
        learner.adapt(images, ["a", "b", "c", "a", "b"])
    with pytest.raises(ValueError, match="5 support images but 4 labels"):
        learner.adapt(images, ["a", "b", "c", "d"])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        learner.adapt([str(broken)] + images[:4], list("abcde"))


def test_adapt_refuses_steps_and_rates_it_cannot_run(checkpoint):
    learner = Learner.load(checkpoint)
    images, labels = [np.zeros((28, 28), dtype=np.uint8)] * 5, list("abcde")
    for kwargs, message in (({"steps": 0}, "steps=0 must be >= 1"),
                            ({"lr": float("nan")}, "lr=nan must be a finite number > 0"),
                            ({"lr": float("inf")}, "lr=inf must be a finite number > 0"),
                            ({"lr": -0.1}, "lr=-0.1 must be a finite number > 0")):
        with pytest.raises(ValueError, match=message):
            learner.adapt(images, labels, **kwargs)
    adapted = learner.adapt(images, labels, steps=1, lr=0.1)  # explicit values are used
    assert len(adapted.predict(images)) == 5


# Every method's meta-test inner loop, and the Learner's (the registered module's), on the
# same task: they must answer alike. Learned rates and per-step batch norms are moved off
# their starting values first, so that one taken from the wrong place shows.
METHODS = {
    "maml": dict(algorithm="maml"),
    "anil": dict(algorithm="anil"),
    "anil+lslr": dict(algorithm="anil", lslr=True),
    "maml++": dict(algorithm="maml", lslr=True, per_step_bn=True),
    "metasgd": dict(algorithm="metasgd", inner_steps=1),
    "protonet": dict(algorithm="protonet"),
    "proto-maml": dict(algorithm="maml", head_init="prototypes"),
    "zero-head": dict(algorithm="fomaml", head_init="zero"),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_the_learner_s_module_answers_as_the_meta_test_for_every_method(method):
    from types import SimpleNamespace

    from test_meta_gradients import image_batch, small_conv

    from metadist.algorithms import MetaStep
    from metadist.training.loop import initial_params

    options = {"inner_lr": 0.3, "inner_steps": 2, **METHODS[method]}
    train_step = MetaStep(**options)
    step = MetaStep(**{**options, "first_order": True})
    model, _ = small_conv()
    cfg = SimpleNamespace(train=SimpleNamespace(seed=0), model=SimpleNamespace(pretrained=None),
                          algorithm=SimpleNamespace(inner_lr=0.3,
                                                    inner_steps=options["inner_steps"]))
    g = torch.Generator().manual_seed(2)
    params = {k: v + (0.05 * torch.rand(v.shape, generator=g) if k.startswith(
        ("lr.", "lslr.", "bnstep.")) else 0) for k, v in
        initial_params(cfg, model, train_step).items()}
    batch = image_batch(tasks=2)
    losses, accs = adapted_scores(model, params, batch, step)
    module = Learner(model, params, None, step, torch.device("cpu")).as_module()
    for t in range(2):
        with torch.no_grad():
            out = module(batch.support_x[t], batch.support_y[t], batch.query_x[t])
        loss = torch.nn.functional.cross_entropy(out, batch.query_y[t])
        assert loss.item() == pytest.approx(losses[t].item(), rel=1e-5), method
