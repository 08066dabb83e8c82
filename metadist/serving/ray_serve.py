"""Few-shot tasks over HTTP from a Ray Serve deployment: ``metadist serve MODEL_URI``.

    POST /predict   one task (``serving.task``'s format) -> its answer
    GET  /healthz   the model a replica serves
    GET  /stats     that replica's cache and batches

A request's body is refused past ``Limits.max_request_bytes`` (413) before it is read
whole. It is then parsed on a worker thread, outside the batch: fields, labels and sizes
checked and the support set hashed from its encoded bytes, the queries decoded, the hash
looked up in the replica's ``AdaptedCache``; a support set whose adapted model is held is
never decoded. ``@serve.batch`` then gathers the parsed tasks of concurrent requests; a
batch adapts each distinct support set once (concurrent misses on one support set share
one inner loop) and answers every task, on a worker thread, so that the event loop keeps
accepting and parsing the next requests while it runs.

Tasks of one shape are not adapted together under ``torch.func.vmap``: measured on
Omniglot 5-way 1-shot with 75 queries (Conv4, one thread), it was 1.3-3.7x slower per task
than one after another (protonet 78-209 against 57-77 ms, Meta-SGD 28-39 against 13-22 ms,
at 1, 8 and 32 tasks), and it changes answers in the last float bits. Stacking tasks into
one plain batch would mix their batch-norm statistics. So batching buys the coalescing
alone: ``benchmarks/results/serve_load.md`` measures the same tasks/s with batches of up
to 16 and of 1.

A client's mistake answers 400 with ``{"error": message}`` naming the field; anything
else 500 with a message, never a traceback (that goes to the replica's log). The replica
keeps serving either way.
"""

# No ``from __future__ import annotations``: FastAPI reads the routes' annotations
# (``request: Request``) as objects; as strings, behind serve.ingress, it took ``request``
# for a query parameter.
import asyncio
import json
import logging
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from metadist.learner import AdaptedLearner, Learner
from metadist.runners.loopback import keep_serve_replica_on_node_address
from metadist.serving.cache import AdaptedCache
from metadist.serving.task import BadRequest, Limits, Task, adapt, answer, decode_task, read_task

APP_NAME = "metadist"  # the Serve application `metadist serve` deploys
MAX_ONGOING = 32  # requests a replica holds at once (at least)
logger = logging.getLogger("ray.serve")
app = FastAPI(title="metadist few-shot tasks", docs_url=None, redoc_url=None)


@dataclass(frozen=True)
class ServeOptions:
    """What a replica is configured with besides its model."""

    max_batch_size: int = 16
    batch_wait_s: float = 0.005
    cache_bytes: int = 256 * 2**20
    limits: Limits = field(default_factory=Limits)


class TooLarge(Exception):
    """A body over the limit (HTTP 413)."""


@serve.deployment(name="FewShot")
@serve.ingress(app)
class FewShotServer:
    """One replica: a Learner, its cache of adapted models, its batches."""

    def __init__(self, checkpoint: bytes, model_uri: str, trust_code: bool,
                 options: ServeOptions) -> None:
        keep_serve_replica_on_node_address()
        # The checkpoint travels as bytes so that a replica on another node of a cluster
        # needs no access to the driver's files or MLflow store.
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "checkpoint.pt"
            path.write_bytes(checkpoint)
            self.learner = Learner.load(path, trust_code=trust_code)
        self.model_uri, self.options, self.limits = model_uri, options, options.limits
        self.cache = AdaptedCache(options.cache_bytes)
        self.answer_batch.set_max_batch_size(options.max_batch_size)
        self.answer_batch.set_batch_wait_timeout_s(options.batch_wait_s)
        self.lock = threading.Lock()
        self.batch_sizes: Counter[int] = Counter()
        self.coalesced = 0  # misses answered by an inner loop run for another request
        self.statuses: Counter[int] = Counter()

    @app.post("/predict")
    async def predict(self, request: Request) -> JSONResponse:
        try:
            body = await self.read_body(request)
            try:
                payload = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise BadRequest(f"body: not a JSON task ({err})") from None
            task, adapted = await asyncio.to_thread(self.parse, payload)
            result = await self.answer_batch((task, adapted))
            if isinstance(result, Exception):
                raise result
            return self.respond(200, result)
        except TooLarge as err:
            return self.respond(413, {"error": str(err)})
        except BadRequest as err:
            return self.respond(400, {"error": str(err)})
        except Exception as err:
            logger.exception("POST /predict failed")
            return self.respond(500, {"error": f"the server failed to answer this task "
                                               f"({type(err).__name__}: {err})"})

    @app.get("/healthz")
    def healthz(self) -> dict:
        step = self.learner.step
        return {"status": "ok", "model": self.model_uri, "algorithm": step.algorithm,
                "ways": self.learner.ways, "inner_steps": step.inner_steps}

    @app.get("/stats")
    def stats(self) -> dict:
        with self.lock:
            sizes = dict(sorted(self.batch_sizes.items()))
            out = {"batches": sum(sizes.values()), "batch_sizes": sizes,
                   "max_batch_size": self.options.max_batch_size,
                   "coalesced": self.coalesced,
                   "responses": dict(sorted(self.statuses.items()))}
        return {"cache": {**self.cache.stats(), "max_bytes": self.cache.max_bytes}, **out,
                "replica": serve.get_replica_context().replica_id.unique_id}

    # -- the steps of a request ------------------------------------------------------------

    async def read_body(self, request: Request) -> bytes:
        limit = self.limits.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise TooLarge(f"body: {int(declared):,} bytes, more than the {limit:,} this "
                           "server takes in one request")
        body = bytearray()
        async for chunk in request.stream():  # a chunked body has no length up front
            body += chunk
            if len(body) > limit:
                raise TooLarge(f"body: more than the {limit:,} bytes this server takes in "
                               "one request")
        return bytes(body)

    def parse(self, payload: object) -> tuple[Task, AdaptedLearner | None]:
        task = decode_task(read_task(payload, self.learner, self.limits), self.limits,
                           support=False)  # queries first: a bad one is no cache lookup
        adapted = self.cache.get(task.key)
        return decode_task(task, self.limits, support=adapted is None), adapted

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def answer_batch(self, items: list[tuple[Task, AdaptedLearner | None]]
                           ) -> list[dict | Exception]:
        return await asyncio.to_thread(self.answer_all, items)

    def answer_all(self, items: list[tuple[Task, AdaptedLearner | None]]
                   ) -> list[dict | Exception]:
        """Each task's answer, or the exception that is its error: one task's failure is
        not its batch's."""
        fresh: dict[str, AdaptedLearner] = {}
        coalesced, results = 0, []
        for task, adapted in items:
            try:
                if adapted is None:
                    adapted = fresh.get(task.key) or self.cache.peek(task.key)
                    if adapted is None:
                        adapted = fresh[task.key] = adapt(self.learner, task)
                        self.cache.put(task.key, adapted)
                    else:
                        coalesced += 1
                results.append(answer(adapted, task))
            except Exception as err:
                results.append(err)
        with self.lock:
            self.batch_sizes[len(items)] += 1
            self.coalesced += coalesced
        return results

    def respond(self, status: int, content: dict) -> JSONResponse:
        with self.lock:
            self.statuses[status] += 1
        return JSONResponse(content, status_code=status)


def application(checkpoint: bytes, model_uri: str, *, trust_code: bool, replicas: int = 1,
                options: ServeOptions = ServeOptions(), num_cpus: float = 1.0):
    """The Serve application of a checkpoint's bytes: ``replicas`` replicas of
    ``num_cpus`` CPUs each. A replica takes up to ``MAX_ONGOING`` requests (or two batches)
    at once: requests it holds are parsed while a batch runs, where Serve's router would
    hold them back and retry (at 32 clients, one request at a time: half the tasks/s or
    less)."""
    return FewShotServer.options(
        num_replicas=replicas,
        max_ongoing_requests=max(MAX_ONGOING, 2 * options.max_batch_size),
        ray_actor_options={"num_cpus": num_cpus},
    ).bind(checkpoint, model_uri, trust_code, options)
