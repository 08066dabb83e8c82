"""`metadist serve`: a Ray Serve deployment answering few-shot tasks over HTTP. One server
(the command as a subprocess, with its own local Ray) answers every HTTP check: the
Learner API's answers on real Omniglot characters, the cache, batches of concurrent
requests, 4xx for a client's mistakes with the server serving on, loopback only, a clean
stop on SIGTERM."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, listeners, omniglot_pngs, process_tree
from PIL import Image

from metadist import Learner
from metadist.cli import main
from metadist.config import load_config
from metadist.launch.cluster import all_procs
from metadist.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items()
       if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE")}
ENV.update(OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")


@pytest.fixture(scope="module")
def checkpoint(omniglot_small, tmp_path_factory) -> str:
    """A 5-way MAML model (its head is learned: it takes exactly 5 classes)."""
    cfg = load_config(ROOT / "configs" / "omniglot_5w1s_maml.yaml", [
        f"data.dataset={omniglot_small}", f"train.output_dir={tmp_path_factory.mktemp('m')}",
        "train.steps=2", "algorithm.meta_batch_size=2", "train.val_every=0",
        "eval.episodes=2", "train.progress=false", "tracking.enabled=false",
        "train.inner_loop=loop",
    ])
    return train(cfg)["checkpoint"]


@pytest.fixture(scope="module")
def pngs(omniglot_small) -> list[list[bytes]]:
    """Real Omniglot test characters as the PNG files a client sends: 12 classes x 3."""
    return omniglot_pngs(omniglot_small / "test", 12)


def task(pngs: list[list[bytes]], first: int = 0) -> dict:
    """5-way 1-shot, 2 queries a class, from classes first..first+4."""
    classes = pngs[first:first + 5]
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return {"support": [b64(c[0]) for c in classes],
            "labels": [f"char-{first + i}" for i in range(5)],
            "query": [b64(b) for c in classes for b in c[1:]]}


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def predict(self, payload) -> tuple[int, dict]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.request("POST", "/predict", body, {"Content-Type": "application/json"})

    def stats(self) -> dict:
        return self.request("GET", "/stats")[1]


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory) -> Server:
    tmp = tmp_path_factory.mktemp("serve")
    port, log = free_port(), tmp / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "metadist.cli", "serve", checkpoint, "--port", str(port),
             "--max-batch-size", "8", "--batch-wait-ms", "100"],
            cwd=tmp, env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    up = Server(proc, port, log)
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, f"serve exited {proc.returncode}: {log.read_text()}"
            assert time.time() < deadline, f"no answer in 180 s: {log.read_text()[-3000:]}"
            try:
                if up.request("GET", "/healthz")[0] == 200:
                    break
            except (OSError, http.client.HTTPException, ValueError):
                pass
            time.sleep(0.5)
        yield up
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def expected(checkpoint: str, request: dict) -> tuple[list, np.ndarray]:
    """The Learner API's labels and probabilities for a request."""
    learner = Learner.load(checkpoint)
    decode = base64.b64decode
    adapted = learner.adapt([decode(s) for s in request["support"]], request["labels"])
    queries = [decode(q) for q in request["query"]]
    return adapted.predict(queries), adapted.predict_proba(queries).numpy()


def test_the_answer_is_the_learner_apis(server, checkpoint, pngs):
    request = task(pngs)
    status, got = server.predict(request)
    assert status == 200, got
    labels, probabilities = expected(checkpoint, request)
    assert got["labels"] == labels and got["classes"] == request["labels"]
    np.testing.assert_allclose(got["probabilities"], probabilities, rtol=0, atol=1e-6)
    assert server.request("GET", "/healthz")[1]["ways"] == 5


def test_a_repeated_support_set_is_a_cache_hit_with_the_same_answer(server, pngs):
    request = task(pngs, 1)
    before = server.stats()["cache"]
    first = server.predict(request)
    again = server.predict(request)
    other_queries = server.predict({**request, "query": request["query"][::-1]})
    after = server.stats()["cache"]
    assert first[0] == again[0] == other_queries[0] == 200
    assert again[1] == first[1]
    assert other_queries[1]["labels"] == first[1]["labels"][::-1]
    assert (after["misses"] - before["misses"], after["hits"] - before["hits"]) == (1, 2)
    assert after["entries"] == before["entries"] + 1


def test_concurrent_tasks_are_batched_with_the_answers_of_one_at_a_time(server, checkpoint,
                                                                        pngs):
    requests = [task(pngs, first) for first in range(2, 8)] * 2  # 6 support sets, twice
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(server.predict, requests))
    stats = server.stats()
    assert max(int(size) for size in stats["batch_sizes"]) > 1, stats
    for request, (status, got) in zip(requests, answers):
        assert status == 200, got
        labels, probabilities = expected(checkpoint, request)
        assert got["labels"] == labels
        np.testing.assert_allclose(got["probabilities"], probabilities, rtol=0, atol=1e-6)


def _png(size: tuple[int, int]) -> str:
    buf = io.BytesIO()
    Image.new("L", size).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(labels=r["labels"][:4]), r"labels: 4 labels for 5 support examples"),
    (lambda r: r["support"].__setitem__(2, base64.b64encode(b"\x89PNG not one").decode()),
     r"support[2]: not a decodable image"),
    (lambda r: r.update(query=r["query"] * 101), r"support + query: 1015 examples, more than "
                                                 r"the 1000"),
    (lambda r: r["query"].__setitem__(1, _png((5000, 5000))), r"query[1]: 5000x5000 pixels"),
    (lambda r: r.update(labels=["a", "b", "c", "d", "d"]),
     r"labels: 4 distinct classes, but this model was meta-trained for 5-way tasks"),
    (lambda r: r.clear(), r"fields ['support', 'labels', 'query'] expected"),
], ids=["label-count", "corrupt-image", "too-many-images", "oversized-image", "ways",
        "empty"])
def test_a_client_mistake_is_a_400_naming_the_field_and_the_server_serves_on(
        server, pngs, change, message):
    request = task(pngs)
    change(request)
    status, got = server.predict(request)
    assert status == 400 and message in got["error"], got
    assert "Traceback" not in got["error"]
    assert server.predict(task(pngs))[0] == 200


def test_a_body_that_is_not_json_is_a_400(server, pngs):
    status, got = server.predict(b'{"support": [')
    assert status == 400 and got["error"].startswith("body: not a JSON task"), got
    assert server.predict(task(pngs))[0] == 200


def test_a_huge_body_is_a_413_before_it_is_read(server, pngs):
    # Declared: answered from the header alone, before the client sends any of the body.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.putrequest("POST", "/predict")
    conn.putheader("Content-Length", str(100 * 2**20))
    conn.putheader("Content-Type", "application/json")
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413, response.read()
    assert "104,857,600 bytes, more than the 67,108,864" in json.loads(response.read())["error"]
    conn.close()
    # Chunked, with no length up front: counted as it arrives. The server answers once
    # past the limit and closes the connection, which may reset it under a client still
    # sending (as any server that refuses a body does): the server's count says it refused.
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    reply = b""
    try:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                     b"application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(80):
            sock.sendall(b"100000\r\n" + b" " * 2**20 + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
        reply = sock.recv(4096)
    except OSError:
        pass
    finally:
        sock.close()
    assert reply == b"" or reply.startswith(b"HTTP/1.1 413"), reply
    assert server.predict(task(pngs))[0] == 200
    assert server.stats()["responses"]["413"] == 2


def test_everything_serve_starts_listens_on_loopback_only(server):
    found = listeners(process_tree(server.proc.pid))
    names = {name for _, name in found}
    # Serve's HTTP proxy, and the replica's own gRPC server, which Ray Serve 2.60 binds to
    # every interface unless metadist rebinds it (metadist.runners.loopback).
    assert {"ray::ProxyActor", "ray::ServeRepli"} <= names, found
    assert ("127.0.0.1", "ray::ProxyActor") in found
    assert {host for host, _ in found} == {"127.0.0.1"}, found


@pytest.mark.parametrize("argv, message", [
    (["/no/such/final.pt"], "MODEL_URI /no/such/final.pt: no such checkpoint file"),
    (["s3://bucket/final.pt"], "MODEL_URI s3://bucket/final.pt: neither a checkpoint file "
                               "nor an MLflow model URI"),
    ([str(ROOT / "pyproject.toml")], "pyproject.toml: not a loadable metadist checkpoint"),
    (["CHECKPOINT", "--replicas", "0"], "--replicas 0: at least 1"),
    (["CHECKPOINT", "--batch-wait-ms", "-1"], "--batch-wait-ms -1: 0 to 10000"),
    (["CHECKPOINT", "--port", "PORT"], "cannot listen there"),
], ids=["missing-file", "other-uri", "not-a-checkpoint", "replicas", "batch-wait",
        "port-in-use"])
def test_a_user_mistake_exits_2_naming_it(server, checkpoint, capsys, argv, message):
    argv = [{"CHECKPOINT": checkpoint, "PORT": str(server.port)}.get(a, a) for a in argv]
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metadist: error: ") and message in err, err


def test_a_missing_checkpoint_exits_2_without_a_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "metadist.cli", "serve", "missing.pt"],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "metadist: error: MODEL_URI missing.pt: no such checkpoint file (a metadist "
        "checkpoint, e.g. runs/NAME/checkpoints/final.pt, or an MLflow model URI: "
        "models:/NAME/VERSION)"]


def test_sigterm_shuts_serve_down_and_everything_it_started(server):
    tree = {p.pid for p in all_procs() if p.session == server.proc.pid}
    assert len(tree) > 3  # the command, Ray's GCS and raylet, Serve's actors
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=120) == 143, server.log.read_text()[-3000:]
    deadline = time.time() + 30
    while {p.pid for p in all_procs() if p.session == server.proc.pid} and \
            time.time() < deadline:
        time.sleep(0.5)
    left = [p for p in all_procs() if p.session == server.proc.pid]
    assert not left, left


def test_an_mlflow_model_uri_serves_the_checkpoint_it_was_logged_with(checkpoint, tmp_path,
                                                                       monkeypatch, capsys):
    import mlflow

    from metadist.launch.serve import read_checkpoint
    from metadist.serving.mlflow_model import log_learner

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    # An experiment of this store: MLflow's active one may be another test's, of another.
    experiment = mlflow.set_experiment("serve")
    with mlflow.start_run(experiment_id=experiment.experiment_id) as run:
        log_learner(checkpoint, name="omniglot-maml")
    mlflow.MlflowClient(uri).set_registered_model_alias("omniglot-maml", "live", "1")
    for model_uri in ("models:/omniglot-maml/1", "models:/omniglot-maml@live",
                      f"runs:/{run.info.run_id}/model"):
        assert read_checkpoint(model_uri) == Path(checkpoint).read_bytes(), model_uri
    assert main(["serve", "models:/omniglot-maml/9"]) == 2
    err = capsys.readouterr().err
    assert "MLflow model models:/omniglot-maml/9" in err and "not found" in err, err
