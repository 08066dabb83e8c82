"""A served task: parsing and limits (every client mistake a BadRequest naming the field),
answers equal to the Learner API's, and the cache of adapted models."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from conftest import omniglot_pngs
from PIL import Image

from metadist import Learner
from metadist.config import load_config
from metadist.serving.cache import AdaptedCache, own_bytes
from metadist.serving.task import BadRequest, Limits, adapt, answer, parse_task
from metadist.training.loop import train

ROOT = Path(__file__).resolve().parents[1]


def _train(config: str, data: Path, out: Path) -> str:
    cfg = load_config(ROOT / "configs" / config, [
        f"data.dataset={data}", f"train.output_dir={out}", "train.steps=2",
        "algorithm.meta_batch_size=2", "train.val_every=0", "eval.episodes=2",
        "train.progress=false", "tracking.enabled=false", "train.inner_loop=loop",
    ])
    return train(cfg)["checkpoint"]


@pytest.fixture(scope="module")
def maml(omniglot_small, tmp_path_factory) -> Learner:
    return Learner.load(_train("omniglot_5w1s_maml.yaml", omniglot_small,
                               tmp_path_factory.mktemp("maml")))


@pytest.fixture(scope="module")
def protonet(omniglot_small, tmp_path_factory) -> Learner:
    return Learner.load(_train("omniglot_5w1s_protonet.yaml", omniglot_small,
                               tmp_path_factory.mktemp("proto")))


@pytest.fixture(scope="module")
def pngs(omniglot_small) -> list[list[bytes]]:
    """Real Omniglot test characters as the PNG files a client would send: 7 classes x 3."""
    return omniglot_pngs(omniglot_small / "test", 7)


def _task(pngs, ways: int, encode=lambda b: base64.b64encode(b).decode()) -> dict:
    return {"support": [encode(c[0]) for c in pngs[:ways]],
            "labels": [f"class-{i}" for i in range(ways)],
            "query": [encode(b) for c in pngs[:ways] for b in c[1:]]}


@pytest.mark.parametrize("encode", [lambda b: base64.b64encode(b).decode(), bytes],
                         ids=["base64", "bytes"])
def test_the_answer_is_the_learner_apis(maml, pngs, encode):
    request = _task(pngs, 5, encode)
    task = parse_task(request, maml)
    got = answer(adapt(maml, task), task)
    adapted = maml.adapt([c[0] for c in pngs[:5]], request["labels"])
    queries = [b for c in pngs[:5] for b in c[1:]]
    assert got["labels"] == adapted.predict(queries)
    np.testing.assert_allclose(got["probabilities"], adapted.predict_proba(queries).numpy(),
                               rtol=0, atol=0)
    assert got["classes"] == request["labels"]


def test_a_protonet_answers_any_number_of_classes(protonet, pngs):
    for ways in (3, 7):
        task = parse_task(_task(pngs, ways), protonet)
        got = answer(adapt(protonet, task), task)
        assert np.array(got["probabilities"]).shape == (2 * ways, ways)
        assert set(got["labels"]) <= {f"class-{i}" for i in range(ways)}


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("change, match", [
    (lambda r: r.update(labels=r["labels"][:4]), r"labels: 4 labels for 5 support"),
    (lambda r: r["support"].__setitem__(2, base64.b64encode(b"\x89PNG not an image").decode()),
     r"support\[2\]: not a decodable image"),
    (lambda r: r["query"].__setitem__(3, "%%% not base64"), r"query\[3\]: not valid base64"),
    (lambda r: r["query"].__setitem__(0, 17), r"query\[0\]: expected an encoded image"),
    (lambda r: r.update(query=r["query"] * 100), r"more than the 1000"),
    (lambda r: r["query"].__setitem__(1, base64.b64encode(_png((5000, 5000))).decode()),
     r"query\[1\]: 5000x5000 pixels"),
    (lambda r: r.update(labels=["a"] * 5), r"at least 2 distinct classes"),
    (lambda r: r.update(labels=["a", "b", "c", "d", "d"]), r"4 distinct classes.*5-way"),
    (lambda r: r.pop("query"), r"missing \['query'\]"),
    (lambda r: r.update(extra=1), r"unknown \['extra'\]"),
    (lambda r: r.update(labels=[1.5] * 5), r"labels\[0\]: a label is a string"),
    (lambda r: r.update(support="abc"), r"support: expected a list"),
    (lambda r: r.update(query=[]), r"query: empty"),
])
def test_every_client_mistake_is_a_bad_request_naming_the_field(maml, pngs, change, match):
    request = _task(pngs, 5)
    change(request)
    with pytest.raises(BadRequest, match=match):
        parse_task(request, maml)


def test_oversized_image_bytes_are_refused_before_decoding(maml, pngs):
    request = _task(pngs, 5)
    with pytest.raises(BadRequest, match=r"support\[0\]: [\d,]+ bytes, more than the 100"):
        parse_task(request, maml, Limits(max_image_bytes=100))


def test_a_regression_task_takes_rows_of_numbers(tmp_path):
    cfg = load_config(ROOT / "configs" / "sinusoid_maml.yaml", [
        f"train.output_dir={tmp_path}", "train.steps=2", "train.val_every=0",
        "eval.episodes=2", "train.progress=false", "tracking.enabled=false"])
    learner = Learner.load(train(cfg)["checkpoint"])
    request = {"support": [[0.1], [0.5], [1.0]], "labels": [0.2, 0.4, 0.9],
               "query": [[0.3], [2.0]]}
    task = parse_task(request, learner)
    got = answer(adapt(learner, task), task)
    expected = learner.adapt([[0.1], [0.5], [1.0]], [0.2, 0.4, 0.9]).predict([[0.3], [2.0]])
    np.testing.assert_allclose(np.array(got["predictions"]).ravel(), expected)
    with pytest.raises(BadRequest, match=r"query: rows of 2 numbers, but the model takes 1"):
        parse_task({**request, "query": [[0.3, 1.0]]}, learner)
    with pytest.raises(BadRequest, match=r"labels\[1\]: expected a finite number"):
        parse_task({**request, "labels": [0.2, float("nan"), 0.9]}, learner)


def test_the_cache_key_is_the_support_set_and_its_labels(maml, pngs):
    a = parse_task(_task(pngs, 5), maml)
    same_support_other_queries = {**_task(pngs, 5), "query": [base64.b64encode(
        pngs[0][2]).decode()]}
    assert parse_task(same_support_other_queries, maml).key == a.key
    swapped = _task(pngs, 5)
    swapped["labels"] = swapped["labels"][::-1]
    assert parse_task(swapped, maml).key != a.key
    assert parse_task(_task(pngs[1:], 5), maml).key != a.key


def test_the_cache_is_bounded_by_the_bytes_adaptation_changed(maml, protonet, pngs):
    task = parse_task(_task(pngs, 5), maml)
    adapted = adapt(maml, task)
    size = own_bytes(adapted)
    assert size == sum(t.nbytes for t in maml.params.values())  # MAML changes everything
    proto = adapt(protonet, parse_task(_task(pngs, 5), protonet))
    head = sum(proto.params[k].nbytes for k in protonet.model.head_keys)
    assert own_bytes(proto) == head < size / 10

    cache = AdaptedCache(max_bytes=2 * size)
    for key in "abc":
        cache.put(key, adapted)
    assert cache.get("a") is None  # the oldest went when the third came in
    assert cache.get("b") is adapted and cache.get("c") is adapted
    cache.put("d", adapted)  # "b" was used before "c": "b" goes
    assert cache.get("b") is None and cache.get("c") is adapted
    assert cache.stats() == {"entries": 2, "bytes": 2 * size, "hits": 3, "misses": 2}
    small = AdaptedCache(max_bytes=size - 1)
    small.put("x", adapted)  # too big to keep: not kept, nothing else evicted for it
    assert small.stats()["entries"] == 0 and small.get("x") is None
