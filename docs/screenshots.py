r"""Screenshots of the MLflow UI for docs/tracking.md, taken with headless Chromium.

    .venv/bin/python docs/screenshots.py [--store mlflow.db] [--out docs/images] [--only NAME ...]

Copies the SQLite store to a temporary folder (the store itself is never written: a run
may be writing to it), serves the copy with ``mlflow server`` on 127.0.0.1, and drives
Chromium (``apt-get install chromium``) over its DevTools protocol: a plain
``chromium --screenshot`` can neither set the UI's browser settings nor wait for a page
to finish loading. The UI is shown as a user who picked *Model training* in its sidebar
sees it, with the assistant panel closed and a few metadist columns added to the runs
table. The artifacts are read where the store says they are.

Shots, each taken when the store has what it needs (``--only`` picks some):

- ``experiments``: the experiments list;
- ``runs``, ``runs-charts``: an experiment's runs, as a table and as charts;
- ``run``, ``run-metrics``, ``run-artifacts``: one run's overview, its metric charts, its
  artifacts with ``curves.png`` open;
- ``sweep``, ``sweep-run``, ``compare``: a sweep's parent run (tag ``sweep=true``) with
  its trials in the runs table, its overview (its logged and registered model), and its
  trials compared (parallel coordinates of the searched values and the validation metric);
- ``models``, ``model-version``: the registered models; the latest registered model
  version, its description and its schema's inputs and outputs opened.

docs/images holds the first six from a store of ``metadist reproduce`` and ``train`` runs
and the last five from a store with one small sweep (in the experiment ``metadist``) and,
registered after it so that ``model-version`` shows it, a short ProtoNet ``train`` run on
Omniglot (in an experiment of its own, so the sweep's table and charts stay its own)::

    metadist tune configs/tune_sinusoid_maml.yaml train.steps=400 train.val_every=50 \
        train.val_episodes=50 train.log_every=10 eval.episodes=200 tune.num_samples=6 \
        tune.max_concurrent=1 tune.grace_period=100 tune.model_name=sinusoid-maml \
        train.output_dir=/tmp/shots/demo2/runs \
        tracking.tracking_uri=sqlite:////tmp/shots/demo2/mlflow.db
    metadist train configs/omniglot_5w1s_protonet.yaml data.dataset=data/omniglot-1200-423 \
        train.steps=30 train.val_every=10 train.threads=1 eval.episodes=50 \
        train.output_dir=/tmp/shots/demo2/runs tracking.experiment=omniglot \
        tracking.register_model=omniglot-protonet \
        tracking.tracking_uri=sqlite:////tmp/shots/demo2/mlflow.db
    .venv/bin/python docs/screenshots.py --store /tmp/shots/demo2/mlflow.db \
        --only sweep sweep-run compare models model-version

(``data/omniglot-1200-423``: ``metadist data convert omniglot ... --split 1200-423``,
docs/data.md.) Both models are registered as metadist's pyfunc model, with a signature,
an input example and a usage text as their description (docs/serving.md).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ("experiments", "runs", "runs-charts", "run", "run-metrics", "run-artifacts", "sweep",
         "sweep-run", "compare", "models", "model-version")
# The UI's own browser settings (mlflow/server/js: its useLocalStorage keys end in "_v1"):
# the sidebar's GenAI / Model training switch; the assistant panel, which opens by itself
# at a first visit; the Model registry's announcement of its new UI, dismissed.
SETTINGS = {
    "mlflow.workflowType_v1": "machine_learning",
    "mlflow.assistant.panelOpen_v1": False,
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True,
    "_mlflow_model_registry_promo_modal_dismissed_v1": True,
}
# The columns the runs table shows besides its own (a user adds them under *Columns*).
METRICS = ("val_accuracy", "test_accuracy", "test_accuracy_ci95", "val_mse", "test_mse",
           "test_mse_ci95")
TAGS = ("algorithm", "ways", "shots")


@dataclass
class Shot:
    name: str
    route: str  # the UI's route, after its "#"
    expect: str  # a text the page shows once loaded
    size: tuple[int, int] = (1400, 860)
    table: dict = field(default_factory=dict)  # the runs table's state, for this experiment
    charts_filter: str = ""  # typed into "Search metric charts" (a regular expression)
    compare_metric: str = ""  # the metric axis of the compare page's parallel coordinates
    expand: tuple[str, ...] = ()  # what is clicked open, in turn: texts its header starts with


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, default=ROOT / "mlflow.db")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--experiment", default="metadist")
    parser.add_argument("--run", help="run id for the run-* shots (default: the finished "
                        "run with the most validations, `metadist reproduce` runs first)")
    parser.add_argument("--only", nargs="+", choices=SHOTS, default=SHOTS)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mlflow-shots-") as tmp:
        tmp = Path(tmp)
        copy = tmp / "mlflow.db"
        copy_store(args.store, copy)
        shots = [shot for shot in plan(contents(copy, args.experiment, args.run))
                 if shot.name in args.only]
        port = args.port or free_port()
        base = f"http://127.0.0.1:{port}"
        args.out.mkdir(parents=True, exist_ok=True)
        with mlflow_server(copy, port, tmp), Browser(args.chromium, tmp / "chromium") as browser:
            wait_for(f"{base}/health", 60)
            browser.open(base + "/")
            browser.store(SETTINGS)
            for shot in shots:
                path = args.out / f"mlflow-{shot.name}.png"
                browser.shoot(base, shot, path)
                print(f"{path}  ({path.stat().st_size // 1024} KB)  #{shot.route}")


def copy_store(store: Path, copy: Path) -> None:
    """A consistent copy of ``store``, even while a run writes to it."""
    if not store.is_file():
        sys.exit(f"no MLflow store at {store}")
    source = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    target = sqlite3.connect(copy)
    with target:
        source.backup(target)
    source.close()
    target.close()


def contents(db: Path, experiment: str, run: str | None) -> dict:
    """What the store holds for the shots: the experiment, a run, a sweep, a model."""
    con = sqlite3.connect(db)

    def rows(query: str, *params) -> list[tuple]:
        return con.execute(query, params).fetchall()

    found = rows("SELECT experiment_id FROM experiments WHERE name = ? AND "
                 "lifecycle_stage = 'active'", experiment)
    if not found:
        sys.exit(f"no active experiment {experiment!r} in the store")
    exp = found[0][0]
    runs = rows(
        "SELECT r.run_uuid, r.name, r.status, "
        "EXISTS(SELECT 1 FROM tags t WHERE t.run_uuid = r.run_uuid AND t.key = 'reproduce_row'), "
        "EXISTS(SELECT 1 FROM tags t WHERE t.run_uuid = r.run_uuid AND t.key = 'sweep' "
        "AND t.value = 'true'), "
        "EXISTS(SELECT 1 FROM tags t WHERE t.run_uuid = r.run_uuid "
        "AND t.key = 'mlflow.parentRunId'), "
        "(SELECT COUNT(*) FROM metrics m WHERE m.run_uuid = r.run_uuid "
        "AND m.key IN ('val_accuracy', 'val_mse')) "
        "FROM runs r WHERE r.experiment_id = ? AND r.lifecycle_stage = 'active' "
        "ORDER BY r.start_time DESC", exp)
    finished = [r for r in runs if r[2] == "FINISHED"]
    if run is not None:
        chosen = [r for r in runs if r[0] == run]
        if not chosen:
            sys.exit(f"no run {run} in experiment {experiment!r}")
    else:
        chosen = sorted([r for r in finished if r[3]] or
                        [r for r in finished if not (r[4] or r[5])] or finished,
                        key=lambda r: -r[6])  # stable: the latest of equals
    metrics = {k for (k,) in rows("SELECT DISTINCT m.key FROM metrics m JOIN runs r ON "
                                  "m.run_uuid = r.run_uuid WHERE r.experiment_id = ?", exp)}
    kind = "accuracy" if metrics & {"val_accuracy", "test_accuracy"} else "mse"
    info = {"experiment": exp, "kind": kind,
            "metrics": [m for m in METRICS if m in metrics and kind in m]}
    if chosen:
        info["run"], info["run_name"] = chosen[0][:2]
    sweeps = [r for r in finished if r[4]]
    if sweeps:
        info["sweep"], info["sweep_name"] = sweeps[0][:2]
        info["searched"] = [k.removeprefix("tune.space.") for (k,) in rows(
            "SELECT key FROM params WHERE run_uuid = ? AND key LIKE 'tune.space.%' "
            "ORDER BY key", sweeps[0][0])]
        info["trials"] = [r for (r,) in rows(
            "SELECT run_uuid FROM tags WHERE key = 'mlflow.parentRunId' AND value = ?",
            sweeps[0][0])]
    model = rows("SELECT name, version FROM model_versions ORDER BY creation_time DESC")
    if model:
        info["model"], info["version"] = model[0]
    con.close()
    return info


def plan(found: dict) -> list[Shot]:
    exp = found["experiment"]
    runs = f"/experiments/{exp}/runs"
    metrics = [f"metrics.`{m}`" for m in found["metrics"]]
    table = runs_table(metrics + [f"tags.`{t}`" for t in TAGS])
    tall = (1400, 1100)
    curves = ("^(train_loss|train_accuracy|val_accuracy)$" if found["kind"] == "accuracy"
              else "^(train_loss|val_mse)$")
    shots = [Shot("experiments", "/experiments", "metadist", (1400, 420)),
             Shot("runs", runs, "matching runs", table=table),
             Shot("runs-charts", f"{runs}?compareRunsMode=CHART", "Add chart", (1400, 680),
                  table=table, charts_filter=curves)]
    if "run" in found:
        run = f"{runs}/{found['run']}"
        shots += [Shot("run", run, "Parameters", tall),
                  Shot("run-metrics", f"{run}/model-metrics", "Model metrics", (1400, 1360)),
                  Shot("run-artifacts", f"{run}/artifacts/curves.png", "checkpoints")]
    if "sweep" in found:
        sweep = runs_table(metrics + [f"params.`{k}`" for k in found["searched"]],
                           expanded=found["sweep"])
        shots += [Shot("sweep", runs, found["sweep_name"] + "-", table=sweep),
                  Shot("sweep-run", f"{runs}/{found['sweep']}", "Parameters", tall),
                  Shot("compare", f"/compare-runs?runs={json.dumps(found['trials'])}"
                       f"&experiments={json.dumps([str(exp)])}", "Parallel", (1400, 620),
                       compare_metric=f"val_{found['kind']}")]
    if "model" in found:
        shots += [Shot("models", "/models", found["model"], (1400, 420)),
                  Shot("model-version", f"/models/{found['model']}/versions/{found['version']}",
                       "Source Run", (1400, 1380),
                       expand=("Description", "Inputs (", "Outputs ("))]
    return shots


def runs_table(columns: list[str], expanded: str | None = None) -> dict:
    """The runs table's state (the UI keeps it per experiment): ``columns`` added, the run
    names wide enough to read, the nested runs of ``expanded`` shown."""
    name = "attributes.`Run Name`"
    widths = {name: 300} | {c: 150 for c in columns if c.startswith("params.")}
    return {"selectedColumns": columns, "columnOrder": [name, *columns],
            "columnWidths": widths, "runsExpanded": {expanded: True} if expanded else {}}


@contextlib.contextmanager
def mlflow_server(db: Path, port: int, cwd: Path):
    # Two processes and half a GB: one worker, no job runner (docs/cluster.md).
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{db}", "--host",
         "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield server
    finally:
        server.terminate()
        server.wait(30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class Browser:
    """Headless Chromium, one tab, driven over the DevTools protocol."""

    def __init__(self, chromium: str, profile: Path) -> None:
        self.chromium, self.profile = chromium, profile

    def __enter__(self) -> Browser:
        from websockets.sync.client import connect  # a dependency of Ray's, in the venv

        self.profile.mkdir()
        self.proc = subprocess.Popen(
            [self.chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.stack = contextlib.ExitStack()
        self.stack.callback(self._stop)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stack.close()
                raise RuntimeError(f"{self.chromium} did not start")
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as response:
            page = next(t for t in json.load(response) if t["type"] == "page")
        self.ws = self.stack.enter_context(connect(page["webSocketDebuggerUrl"], max_size=None))
        self.next_id = 0
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()

    def _stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:  # events come in between; only the answer matters
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def store(self, items: dict) -> None:
        """Into the UI's localStorage (the page must be on the server's origin)."""
        self.evaluate("".join(f"localStorage.setItem({json.dumps(k)}, {json.dumps(json.dumps(v))});"
                              for k, v in items.items()))

    def open(self, url: str) -> None:
        self.call("Page.navigate", url="about:blank")
        self.call("Page.navigate", url=url)

    def settle(self, expect: str, timeout: float = 60) -> None:
        """Until ``expect`` shows, no spinner spins and the text stays the same 2 s."""
        deadline = time.monotonic() + timeout
        state, still = None, 0
        probe = (f"[document.body.innerText.includes({json.dumps(expect)}), "
                 "document.querySelectorAll('[role=progressbar], [aria-busy=true], "
                 "[class*=Spinner], [class*=spinner], [class*=skeleton]').length, "
                 "document.body.innerText]")
        while still < 4:
            if time.monotonic() > deadline:
                text = self.evaluate("document.body.innerText")[:300]
                raise RuntimeError(f"no {expect!r} after {timeout:.0f} s; the page shows {text!r}")
            time.sleep(0.5)
            now = self.evaluate(probe)
            still = still + 1 if now == state and now[0] and not now[1] else 0
            state = now

    def shoot(self, base: str, shot: Shot, path: Path) -> None:
        width, height = shot.size
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)
        if shot.table:  # the page is on the server's origin: the previous shot's
            experiment = shot.route.split("/")[2]
            self.store({f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment}"]-'
                        "ReactComponentState": shot.table})
        self.open(f"{base}/#{shot.route}")
        self.settle(shot.expect)
        if shot.charts_filter:
            self.evaluate("document.querySelector('input[placeholder=\"Search metric charts\"]')"
                          ".focus()")
            self.call("Input.insertText", text=shot.charts_filter)
            self.settle("train_loss")
        if shot.compare_metric:
            self.pick_compare_metric(shot.compare_metric)
        for header in shot.expand:
            self.click_open(header)
        time.sleep(1)  # charts draw after the data arrive
        png = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        save_small(png, path)

    def click_open(self, header: str) -> None:
        """A click on the innermost element whose text starts with ``header``: a
        collapsed section (``aria-expanded=false``; an open one is left open) or a row of
        the model version's schema table (its Inputs and Outputs start closed)."""
        where = self.evaluate(
            "(() => { const all = [...document.querySelectorAll('body *')].filter(e => "
            f"e.innerText && e.innerText.trim().startsWith({json.dumps(header)}) && "
            "e.getBoundingClientRect().height > 0);"
            "const leaf = all.filter(e => !all.some(o => o !== e && e.contains(o))).pop();"
            "if (!leaf) return null; const r = leaf.getBoundingClientRect();"
            "const section = leaf.closest('[aria-expanded]');"
            "return [r.left, r.top + r.height / 2, section ? section.getAttribute("
            "'aria-expanded') : null]; })()")
        if where is None:
            print(f"{header!r} not on the page; left as it is")
            return
        x, y, expanded = where
        if expanded == "true":
            return
        before = self.evaluate("document.body.innerText.length")
        for kind in ("mousePressed", "mouseReleased"):  # its icon, at the left
            self.call("Input.dispatchMouseEvent", type=kind, x=x + 8, y=y, button="left",
                      clickCount=1)
        time.sleep(1)
        if self.evaluate("document.body.innerText.length") <= before:
            print(f"a click on {header!r} showed nothing more")

    def pick_compare_metric(self, metric: str) -> None:
        """In the compare page's "Metrics:" select (the second one; MLflow's design
        system's class names), ``metric`` instead of the first metric the page picked."""
        select = "du-bois-light-select"
        opened = self.evaluate(
            f"(() => {{ const s = document.querySelectorAll('.{select}-selector')[1];"
            "if (!s) return false; s.dispatchEvent(new MouseEvent('mousedown', "
            "{bubbles: true})); return true; })()")
        time.sleep(1)
        picked = opened and self.evaluate(
            f"(() => {{ const options = [...document.querySelectorAll('.{select}-item-option')];"
            f"const want = options.find(o => o.getAttribute('title') === {json.dumps(metric)});"
            "if (!want) return false; want.click();"
            f"options.filter(o => o !== want && o.classList.contains('{select}-item-option-"
            "selected')).forEach(o => o.click()); return true; })()")
        for kind in ("mousePressed", "mouseReleased"):  # a click beside it closes the list
            self.call("Input.dispatchMouseEvent", type=kind, x=1000, y=60, button="left",
                      clickCount=1)
        if not picked:
            print(f"compare page: could not pick {metric}; it shows its first metric")
        self.settle("Parallel")


def save_small(png: bytes, path: Path) -> None:
    """A 256-colour PNG: a UI screenshot loses nothing visible and shrinks 3 to 5 times."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
                   ).save(path, optimize=True)


if __name__ == "__main__":
    main()
