"""The registered MLflow pyfunc model: `metadist train` registers it on request, its answers
in Python and through `mlflow models serve` (a real HTTP server on loopback) equal the
Learner API's on real Omniglot tasks, and a client's mistakes answer 400 naming the field
while the server keeps serving."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import free_port, listening_addresses, omniglot_pngs, process_tree
from mlflow import MlflowClient
from PIL import Image

from metadist import Learner
from metadist.config import ConfigError, load_config
from metadist.launch.run import tracked_training
from metadist.training.runtime import NonFiniteError

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"proto": "omniglot_5w1s_protonet.yaml", "maml": "omniglot_5w1s_maml.yaml"}


def _config(config: str, out: Path, uri: str, *overrides: str):
    return load_config(ROOT / "configs" / config, [
        f"train.output_dir={out}", "train.steps=2", "train.val_every=0", "eval.episodes=2",
        "train.progress=false", f"tracking.tracking_uri={uri}", *overrides])


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A SQLite tracking store of this module's own; MLflow's client points at it."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def trained(omniglot_small, store, tmp_path_factory) -> dict[str, dict]:
    """A protonet and a (5-way, learned head) MAML, 2 steps each, trained as `metadist
    train` trains them, with tracking.register_model=proto / maml."""
    out = tmp_path_factory.mktemp("runs")
    results = {}
    for name, config in MODELS.items():
        results[name] = tracked_training(_config(
            config, out, store, f"data.dataset={omniglot_small}", "algorithm.meta_batch_size=2",
            "train.inner_loop=loop", f"tracking.register_model={name}"))
        mlflow.set_tracking_uri(store)  # the tracker pointed MLflow at the run's store
    return results


@pytest.fixture(scope="module")
def learners(trained) -> dict[str, Learner]:
    return {name: Learner.load(result["checkpoint"]) for name, result in trained.items()}


@pytest.fixture(scope="module")
def pngs(omniglot_small) -> list[list[bytes]]:
    """Real Omniglot test characters as the PNG files a client sends: 7 classes x 3."""
    return omniglot_pngs(omniglot_small / "test", 7)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _task(pngs, ways: int) -> dict:
    return {"support": [_b64(c[0]) for c in pngs[:ways]],
            "labels": [f"class-{i}" for i in range(ways)],
            "query": [_b64(b) for c in pngs[:ways] for b in c[1:]]}


def _assert_learners_answer(learner: Learner, task: dict, got: dict, atol: float = 0) -> None:
    """``got`` is what ``learner`` answers to ``task`` through the Learner API."""
    decoded = {f: [base64.b64decode(v) for v in task[f]] for f in ("support", "query")}
    adapted = learner.adapt(decoded["support"], task["labels"])
    assert got["labels"] == adapted.predict(decoded["query"])
    np.testing.assert_allclose(got["probabilities"],
                               adapted.predict_proba(decoded["query"]).numpy(), rtol=0,
                               atol=atol)
    assert got["classes"] == list(dict.fromkeys(task["labels"]))


# -- in Python -------------------------------------------------------------------------


@pytest.mark.parametrize("name, ways", [("maml", 5), ("proto", 3), ("proto", 7)])
def test_the_pyfunc_answers_as_the_learner_api(trained, learners, pngs, name, ways):
    model = mlflow.pyfunc.load_model(f"models:/{name}/1")
    task = _task(pngs, ways)
    [got] = model.predict(task)
    _assert_learners_answer(learners[name], task, got)
    # A list of tasks gets a list of answers; a support set seen before is not re-adapted.
    # (The same queries in another order: batch norm is transductive, a subset would differ.)
    again = {**task, "query": task["query"][::-1]}
    both = model.predict([task, again])
    assert both[0] == got and both[1]["labels"] == got["labels"][::-1]
    assert model.unwrap_python_model().cache.stats()["hits"] == 2


def test_a_fixed_head_model_refuses_another_number_of_classes(trained):
    model = mlflow.pyfunc.load_model("models:/maml/1")
    example = model.input_example
    assert len(example["labels"][0]) == 5  # the example fits the model's 5-way head
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"labels: 3 distinct classes"):
        model.predict({**example.iloc[0].to_dict(), "labels": ["a", "b", "c", "c", "c"]})


def test_train_registers_a_version_with_signature_example_and_usage(trained, store):
    client = MlflowClient(store)
    for name, result in trained.items():
        version = client.get_model_version(name, "1")
        assert version.run_id == result["mlflow_run_id"]
        assert result["registered_model"] == {"name": name, "version": "1",
                                               "model_uri": f"models:/{name}/1"}
        info = mlflow.models.get_model_info(f"models:/{name}/1")
        assert info.signature.inputs.input_names() == ["support", "labels", "query"]
        assert info.signature.outputs.input_names() == ["labels", "probabilities", "classes"]
        # The input example is a request the model answers; the description says how.
        model = mlflow.pyfunc.load_model(f"models:/{name}/1")
        [answer] = model.predict(model.input_example)
        assert len(answer["probabilities"]) == len(model.input_example["query"][0])
        description = client.get_registered_model(name).description
        assert f"mlflow models serve -m models:/{name}/1 --env-manager local" in description
        assert "curl" in description and "/invocations" in description
        assert f'mlflow.pyfunc.load_model("models:/{name}/1")' in description
        assert client.get_model_version(name, "1").description == description
    assert "any number of classes" in client.get_registered_model("proto").description
    assert "exactly 5 classes" in client.get_registered_model("maml").description


def test_a_regression_model_takes_feature_rows(store, tmp_path):
    from metadist.serving.mlflow_model import log_learner

    result = tracked_training(_config("sinusoid_maml.yaml", tmp_path, store))
    mlflow.set_tracking_uri(store)
    with mlflow.start_run(run_id=result["mlflow_run_id"]):
        info = log_learner(result["checkpoint"])
    assert info["name"] is None
    model = mlflow.pyfunc.load_model(info["model_uri"])
    assert model.metadata.signature.outputs.input_names() == ["predictions"]
    task = {"support": [[0.1], [0.5], [1.0]], "labels": [0.2, 0.4, 0.9], "query": [[0.3], [2.0]]}
    [got] = model.predict(task)
    expected = Learner.load(result["checkpoint"]).adapt(task["support"], task["labels"])
    np.testing.assert_allclose(np.ravel(got["predictions"]), expected.predict(task["query"]))


def test_a_diverged_run_registers_nothing(store, tmp_path):
    config = _config("sinusoid_maml.yaml", tmp_path, store, "train.steps=3",
                     "algorithm.outer_lr=1e30", "tracking.register_model=diverged")
    with pytest.raises(NonFiniteError):
        tracked_training(config)
    mlflow.set_tracking_uri(store)
    assert not MlflowClient(store).search_registered_models("name = 'diverged'")


@pytest.mark.parametrize("override, match", [
    ("tracking.register_model=a/b", r"tracking.register_model='a/b' is not a Model Registry"),
    ("tune.model_name=x:1", r"tune.model_name='x:1' is not a Model Registry"),
])
def test_registry_names_are_checked_before_training(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(ROOT / "configs" / "sinusoid_maml.yaml", [override])
    with pytest.raises(ConfigError, match=r"tracking.enabled=false"):
        load_config(ROOT / "configs" / "sinusoid_maml.yaml",
                    ["tracking.register_model=m", "tracking.enabled=false"])


# -- through `mlflow models serve` -----------------------------------------------------


@pytest.fixture(scope="module")
def server(trained, store, tmp_path_factory):
    """``mlflow models serve -m models:/proto/1`` on 127.0.0.1 (a process group of its own):
    its base URL and its processes."""

    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # uvicorn, which MLflow runs by name
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "OMP_NUM_THREADS": "1",
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/proto/1",
             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=1):
                    break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.3)
        yield url, process_tree(proc.pid)  # the CLI, the shell it starts, uvicorn
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_mlflow_models_serve_answers_as_the_learner_api(server, learners, pngs):
    url, pids = server
    for ways, body in ((5, lambda t: {"dataframe_records": [t]}),
                       (6, lambda t: {"dataframe_split": {"columns": list(t),
                                                          "data": [list(t.values())]}})):
        task = _task(pngs, ways)
        status, got = _post(url, body(task))
        assert status == 200, got
        [answer] = got["predictions"]
        # Another process with its own copy of the checkpoint, and JSON between: the same
        # labels, and probabilities to float32's last digits.
        _assert_learners_answer(learners["proto"], task, answer, atol=1e-6)
    assert set(listening_addresses(pids)) == {"127.0.0.1"}


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("change, match", [
    (lambda t: t.update(labels=t["labels"][:4]), r"labels: 4 labels for 5 support examples"),
    (lambda t: t["support"].__setitem__(2, _b64(b"\x89PNG\r\n\x1a\n not an image")),
     r"support\[2\]: not a decodable image"),
    (lambda t: t.update(query=t["query"] * 100), r"support \+ query: 1005 examples, more than "
     r"the 1000"),
    (lambda t: t["query"].__setitem__(1, _b64(_png((5000, 5000)))),
     r"query\[1\]: 5000x5000 pixels, more than the 16,777,216"),
    (lambda t: t["query"].__setitem__(0, _b64(b"\0" * (2 * 2**20 + 1))),
     r"query\[0\]: 2,097,153 bytes, more than the 2,097,152"),
], ids=["label-count", "corrupt-image", "too-many-images", "oversized-pixels",
        "oversized-bytes"])
def test_a_bad_request_answers_400_naming_the_field_and_the_server_serves_on(
        server, pngs, change, match):
    url, _ = server
    task = _task(pngs, 5)
    change(task)
    status, got = _post(url, {"dataframe_records": [task]})
    assert status == 400 and got["error_code"] == "INVALID_PARAMETER_VALUE"
    # MLflow's scoring server puts the request's DataFrame before the model's own message.
    assert re.search(match, got["message"].rpartition("\nError: ")[2]), got["message"][-500:]
    status, got = _post(url, {"dataframe_records": [_task(pngs, 3)]})
    assert status == 200 and len(got["predictions"][0]["labels"]) == 6

