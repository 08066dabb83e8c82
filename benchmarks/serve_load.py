"""A bounded load test of a few-shot server on loopback: latency (p50, p99) and tasks/s
at 1, 8 and 32 concurrent clients, for a cache hit (one task repeated) and a miss (a
support set never sent before in the run, for every request).

Tasks are real Omniglot 5-way 1-shot tasks with 15 queries per class (80 PNG files a
request, as a client sends them), drawn with a fixed seed from the held-out test classes
of ``data/omniglot-1200-423/test``; labels are the characters' names. The bodies are
encoded before the clock starts. Each cell sends a fixed number of requests
(``--requests``, at least 4 per client) and stops early after ``--max-seconds``; the
first requests of a cell (one per client) warm it and are not counted.

Servers:

- ``metadist serve`` (Ray Serve), started here for each ``--model`` and each
  ``--max-batch-size`` (default 16, and 1: one task per batch, for the comparison);
  between cells its /stats gives the batch sizes and cache counts;
- ``--url URL``: a server already running (``--mlflow`` if it is ``mlflow models
  serve``: the same task as ``{"dataframe_records": [task]}`` on /invocations);
- ``--mlflow-model URI``: ``mlflow models serve -m URI --env-manager local`` started
  here on 127.0.0.1 (a model ``metadist.serving.mlflow_model.log_learner`` logged; given a
  checkpoint file, the script logs it so into a temporary store first).

    python benchmarks/serve_load.py --model runs/NAME/checkpoints/final.pt \
        [--model ...] [--max-batch-size 16,1] [--clients 1,8,32] [--requests 64] \
        [--mlflow-model models:/NAME/1] [--shared "a 1-thread training job ran beside"]

Results: a Markdown table on stdout and in benchmarks/results/serve_load.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import aiohttp
import numpy as np
import pyarrow.parquet as pq

from metadist.data import Manifest
from metadist.launch.reproduce import machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "serve_load.md"


# -- tasks --------------------------------------------------------------------------------


class Tasks:
    """Distinct 5-way 1-shot tasks (15 queries a class) from a split's PNG files."""

    def __init__(self, split: Path, ways: int = 5, queries: int = 15, seed: int = 0):
        manifest = Manifest.load(split / "manifest.json")
        self.classes: list[tuple[str, list[bytes]]] = []
        for entry in manifest.classes:
            rows = pq.ParquetFile(split / entry.shard).read_row_group(
                entry.row_group, columns=["image"]).column("image").to_pylist()
            self.classes.append((entry.label, [r["bytes"] for r in rows]))
        self.ways, self.queries = ways, queries
        self.rng = random.Random(seed)
        self.seen: set[tuple] = set()

    def fresh(self) -> dict:
        """A task whose support set (its images and labels) no earlier call returned."""
        while True:
            chosen = self.rng.sample(self.classes, self.ways)
            picks = [self.rng.sample(range(len(images)), 1 + self.queries)
                     for _, images in chosen]
            key = tuple((name, p[0]) for (name, _), p in zip(chosen, picks))
            if key not in self.seen:
                self.seen.add(key)
                break
        b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
        return {"support": [b64(images[p[0]]) for (_, images), p in zip(chosen, picks)],
                "labels": [name for name, _ in chosen],
                "query": [b64(images[i]) for (_, images), p in zip(chosen, picks)
                          for i in p[1:]]}


# -- servers ------------------------------------------------------------------------------


@dataclass
class Target:
    name: str  # what the table calls it
    url: str
    mlflow: bool = False
    process: subprocess.Popen | None = None
    stats: bool = False  # metadist's /stats

    def body(self, task: dict) -> bytes:
        return json.dumps({"dataframe_records": [task]} if self.mlflow else task).encode()

    @property
    def endpoint(self) -> str:
        return self.url + ("/invocations" if self.mlflow else "/predict")

    def get_stats(self) -> dict | None:
        if not self.stats:
            return None
        with urllib.request.urlopen(self.url + "/stats", timeout=30) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv: list[str], url: str, health: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           # `mlflow models serve` runs `uvicorn` from PATH: this environment's.
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    env.pop("RAY_ADDRESS", None)
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{shlex.join(argv)} exited {proc.returncode}: "
                             f"{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + health, timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit(f"{shlex.join(argv)}: no answer within 300 s")


def start_metadist(model: str, max_batch: int, log_dir: Path) -> Target:
    port = free_port()
    argv = [sys.executable, "-m", "metadist.cli", "serve", model, "--port", str(port),
            "--max-batch-size", str(max_batch)]
    url = f"http://127.0.0.1:{port}"
    proc = start(argv, url, "/healthz", log_dir / f"serve-{port}.log")
    return Target(f"metadist serve, batch <= {max_batch}", url, process=proc, stats=True)


def start_mlflow(model: str, log_dir: Path) -> Target:
    """``mlflow models serve`` on an MLflow model URI, or on a checkpoint file first logged
    with ``log_learner`` into a temporary store."""
    if Path(model).is_file():
        import mlflow

        from metadist.serving.mlflow_model import log_learner

        store = Path(tempfile.mkdtemp(prefix="serve-load-mlflow-"))
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        with mlflow.start_run():
            model = log_learner(model)["model_uri"]
    port = free_port()
    argv = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model,
            "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    url = f"http://127.0.0.1:{port}"
    proc = start(argv, url, "/ping", log_dir / f"mlflow-{port}.log")
    return Target("mlflow models serve", url, mlflow=True, process=proc)


# -- load ---------------------------------------------------------------------------------


async def load(target: Target, bodies: list[bytes], clients: int, warm: list[bytes],
               max_seconds: float) -> tuple[list[float], int, float]:
    """Latencies (s) of the answered requests, errors, wall seconds; ``warm`` first,
    untimed."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    latencies: list[float] = []
    errors = 0
    headers = {"Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=300)
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def post(body: bytes) -> bool:
            async with session.post(target.endpoint, data=body, headers=headers) as r:
                await r.read()
                return r.status == 200

        await asyncio.gather(*(post(b) for b in warm))
        deadline = time.perf_counter() + max_seconds

        async def client() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                try:
                    body = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                t0 = time.perf_counter()
                ok = await post(body)
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return latencies, errors, wall


@dataclass
class Row:
    target: str
    model: str
    mode: str
    clients: int
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    tasks_per_s: float
    mean_batch: float | None

    def cells(self) -> list[str]:
        batch = "" if self.mean_batch is None else f"{self.mean_batch:.1f}"
        return [self.target, self.model, self.mode, str(self.clients), str(self.requests),
                str(self.errors), f"{self.p50_ms:.0f}", f"{self.p99_ms:.0f}",
                f"{self.tasks_per_s:.1f}", batch]


HEADER = ["server", "model", "cache", "clients", "requests", "errors", "p50 ms", "p99 ms",
          "tasks/s", "mean batch"]


def mean_batch(before: dict | None, after: dict | None) -> float | None:
    if before is None or after is None:
        return None
    sizes = {int(k): v - before["batch_sizes"].get(k, 0)
             for k, v in after["batch_sizes"].items()}
    batches = sum(sizes.values())
    return sum(k * v for k, v in sizes.items()) / batches if batches else None


def run_target(target: Target, model: str, tasks: Tasks, clients_list: list[int],
               requests: int, max_seconds: float) -> list[Row]:
    rows = []
    for mode in ("miss", "hit"):
        for clients in clients_list:
            n = max(requests, 4 * clients)
            if mode == "hit":
                repeated = target.body(tasks.fresh())
                warm, bodies = [repeated] * clients, [repeated] * n
            else:
                warm = [target.body(tasks.fresh()) for _ in range(clients)]
                bodies = [target.body(tasks.fresh()) for _ in range(n)]
            before = target.get_stats()
            latencies, errors, wall = asyncio.run(load(target, bodies, clients, warm,
                                                       max_seconds))
            after = target.get_stats()
            ms = np.array(latencies) * 1000
            row = Row(target.name, model, mode, clients, len(latencies), errors,
                      float(np.percentile(ms, 50)) if len(ms) else float("nan"),
                      float(np.percentile(ms, 99)) if len(ms) else float("nan"),
                      len(latencies) / wall, mean_batch(before, after))
            print(" | ".join(row.cells()), flush=True)
            rows.append(row)
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |",
             "|" + "|".join("---" if i < 3 else "---:" for i in range(len(HEADER))) + "|"]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", default=[],
                        help="a checkpoint for `metadist serve` (repeatable)")
    parser.add_argument("--max-batch-size", default="16,1",
                        help="`metadist serve --max-batch-size` values, one server each")
    parser.add_argument("--url", help="a running server instead")
    parser.add_argument("--mlflow", action="store_true",
                        help="--url is `mlflow models serve` (/invocations)")
    parser.add_argument("--mlflow-model", help="start `mlflow models serve` on this model: "
                        "an MLflow model URI, or a checkpoint to log with log_learner into a "
                        "temporary store first")
    parser.add_argument("--split", default=str(ROOT / "data" / "omniglot-1200-423" / "test"))
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", type=int, default=64, help="per cell (at least 4 a "
                        "client)")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="per cell")
    parser.add_argument("--shared", default="", help="what else ran on the machine")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    began = time.time()
    load_avg = os.getloadavg()
    tasks = Tasks(Path(args.split))
    clients = [int(c) for c in args.clients.split(",")]
    log_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    print(" | ".join(HEADER))
    rows: list[Row] = []
    if args.url:
        target = Target("mlflow models serve" if args.mlflow else "server at --url",
                        args.url.rstrip("/"), mlflow=args.mlflow, stats=not args.mlflow)
        rows += run_target(target, args.url, tasks, clients, args.requests, args.max_seconds)
    for model in args.model:
        short = _short_model(model)
        for max_batch in [int(b) for b in args.max_batch_size.split(",")]:
            target = start_metadist(model, max_batch, log_dir)
            try:
                rows += run_target(target, short, tasks, clients, args.requests,
                                   args.max_seconds)
            finally:
                target.stop()
    if args.mlflow_model:
        target = start_mlflow(args.mlflow_model, log_dir)
        try:
            rows += run_target(target, _short_model(args.mlflow_model), tasks, clients,
                               args.requests, args.max_seconds)
        finally:
            target.stop()
    report = render(rows, args, load_avg, time.time() - began)
    print(report)
    Path(args.out).write_text(report)


def _short_model(model: str) -> str:
    path = Path(model)
    return path.parent.parent.name if path.parent.name == "checkpoints" else model


def render(rows: list[Row], args, load_avg: tuple, seconds: float,
           command: str | None = None, date: datetime | None = None) -> str:
    info = machine()
    cpu = info.get("cpu_model") or "CPU"
    shared = (f"yes: {args.shared}" if args.shared else "not known to be")
    command = command or " ".join(shlex.quote(a) for a in sys.argv)
    split = Path(args.split).resolve()
    split = split.relative_to(ROOT) if split.is_relative_to(ROOT) else split
    servers = ["`metadist serve MODEL --max-batch-size N` (Ray Serve, one replica of 1 CPU, "
               "its own local Ray)"]
    if args.mlflow_model or args.mlflow:
        servers.append("`mlflow models serve --env-manager local` (one uvicorn worker) on "
                       "the pyfunc model `log_learner` logs"
                       + (" from the same checkpoint, in a temporary store"
                          if args.mlflow_model and Path(args.mlflow_model).is_file() else ""))
    return f"""# Serving load: few-shot tasks over HTTP on loopback

Machine: {info['cpus']}-core CPU, {cpu}, torch {info['torch']}. Server and
clients on the same machine, over 127.0.0.1. Shared: {shared} (load average
{load_avg[0]:.2f} at the start). Date: {(date or datetime.now()):%Y-%m-%d %H:%M};
{seconds / 60:.1f} minutes in all.

Command: `python {command}`

Servers: {"; ".join(servers)}. Models: the run directories named in the table
(`runs/NAME/checkpoints/final.pt`).

Tasks: real Omniglot 5-way 1-shot with 15 queries a class (80 PNG files a request), drawn
with a fixed seed from the held-out test classes of `{split}`. `miss`: every request a
support set never sent before in the run (the inner loop runs); `hit`: one task repeated
(its adapted model cached: no inner loop, no decoding of the support set). Each cell: up
to max({args.requests}, 4 x clients) requests or {args.max_seconds:g} s, after one untimed
request per client; tasks/s = answered requests / wall time; p99 of 64 requests is about
their maximum. `mean batch`: the replica's batches during the cell (its /stats). Clients:
asyncio/aiohttp in one process.

{table(rows)}
"""


if __name__ == "__main__":
    main()
