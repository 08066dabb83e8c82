"""Reproduce the papers' tables: every row of ``configs/reproduce/tables.yaml`` is a config (plus
overrides) that meta-trains and meta-tests one published number. ``metadist reproduce
TABLE`` runs the rows through the same path as ``metadist train`` (tracked in MLflow),
records each result with its budget and machine under ``docs/results/``, and regenerates
``docs/results.md``: our numbers beside the papers', with learning curves.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from metadist.config import Config, ConfigError, load_config
from metadist.launch.run import tracked_training
from metadist.tracking import git_commit, git_uncommitted, log_to_run, plot_curves
from metadist.training.evaluate import evaluate_checkpoint

REPO = Path(__file__).resolve().parents[2]
TABLES = REPO / "configs" / "reproduce" / "tables.yaml"
RESULTS = REPO / "docs" / "results"
REPORT = REPO / "docs" / "results.md"
BUDGETS = ("cpu", "full")


@dataclass
class Row:
    table: str
    split: str
    setting: str
    algorithm: str
    config: Path
    overrides: list[str]
    budget: dict[str, list[str]]
    paper: float | None
    paper_non_transductive: float | None
    dataset: str = ""
    # Queries per class in the paper's own test episodes: an int, or "shots".
    paper_queries: int | str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.table}-{self.split}-{self.setting}-{self.algorithm}"

    def command(self, budget: str) -> str:
        return f"metadist reproduce {self.table} --rows {self.id} --budget {budget}"


def load_rows(path: Path = TABLES) -> dict[str, list[Row]]:
    """Every row of every table, in the order of the file."""
    spec = yaml.safe_load(Path(path).read_text())
    tables: dict[str, list[Row]] = {}
    for table, t in spec.items():
        rows = tables[table] = []
        for split, sp in t["splits"].items():
            for setting, st in t["settings"].items():
                for algorithm, a in t["algorithms"].items():
                    config = REPO / a["config"].format(base=st["base"])
                    # An algorithm may set its own steps and overrides, for every setting
                    # (a list) or per setting (a mapping).
                    steps = {**t["cpu_steps"], **a.get("cpu_steps", {})}[setting]
                    cpu = [f"train.steps={steps}",
                           *_for_setting(a.get("cpu_overrides", []), setting)]
                    budget = {k: _for_setting(v, setting) for k, v in a["budget"].items()}
                    rows.append(Row(
                        table=table, split=split, setting=setting, algorithm=algorithm,
                        config=config, dataset=sp["dataset"],
                        overrides=[f"data.dataset={sp['dataset']}", *st["overrides"],
                                   *_for_setting(a.get("overrides", []), setting)],
                        budget={"cpu": cpu, **budget},
                        paper=a["paper"].get(setting) if sp["paper"] else None,
                        paper_non_transductive=(a["paper_non_transductive"].get(setting)
                                                if sp["paper"] else None),
                        paper_queries=a.get("paper_queries"),
                    ))
    return tables


def _for_setting(value: list | dict, setting: str) -> list:
    return value.get(setting, []) if isinstance(value, dict) else value


def select(tables: dict[str, list[Row]], table: str, rows: list[str] | None) -> list[Row]:
    names = list(tables) if table == "all" else [table]
    for name in names:
        if name not in tables:
            raise ConfigError(f"no table {name!r} in {TABLES}: one of {list(tables)} or 'all'")
    chosen = [r for n in names for r in tables[n]]
    if rows:
        known = {r.id for r in chosen}
        unknown = [r for r in rows if r not in known]
        if unknown:
            raise ConfigError(f"unknown rows {unknown}; rows of {table}: {sorted(known)}")
        chosen = [r for r in chosen if r.id in rows]
    return chosen


def paper_queries(row: Row, shots: int) -> int | None:
    """How many queries per class the paper's code tests on, for this row at ``shots``."""
    if row.paper_queries is None:
        return None
    if row.paper_queries == "shots":
        return shots
    if isinstance(row.paper_queries, bool) or not isinstance(row.paper_queries, int) \
            or row.paper_queries < 1:
        raise ConfigError(f"{TABLES}: paper_queries of {row.id} must be 'shots' or an "
                          f"integer >= 1, got {row.paper_queries!r}")
    return row.paper_queries


def row_config(row: Row, budget: str, overrides: list[str] = ()) -> Config:
    if budget not in BUDGETS:
        raise ConfigError(f"--budget {budget!r} is not one of {list(BUDGETS)}")
    config = load_config(row.config, [*row.overrides, *row.budget[budget], *overrides])
    config.name = row.id
    return config


def effective_overrides(overrides: list[str]) -> list[str]:
    """Each key once, at the value that took effect (the last), where it first appeared: a
    record that listed ``train.steps=300`` beside ``train.steps=3000`` would need the reader
    to know that the last one wins."""
    last = {item.partition("=")[0]: item for item in overrides}
    return list(dict.fromkeys(last[item.partition("=")[0]] for item in overrides))


def run_row(row: Row, budget: str, overrides: list[str], results: Path = RESULTS) -> dict:
    """Meta-train and meta-test one row, tracked like ``metadist train``, and record it."""
    config = row_config(row, budget, overrides)
    queries = paper_queries(row, config.data.shots)
    # Read before training, as the run's MLflow tags are: the code that ran is the code at
    # the start, whatever is edited while a long row trains.
    code = {"commit": git_commit(), "uncommitted": git_uncommitted()}
    started = time.perf_counter()
    result = tracked_training(config, tags={"reproduce_table": row.table,
                                            "reproduce_row": row.id, "budget": budget})
    record = {
        "row": row.id, "table": row.table, "split": row.split, "setting": row.setting,
        "algorithm": row.algorithm, "budget": budget,
        "overrides": effective_overrides([*row.overrides, *row.budget[budget], *overrides]),
        "config": str(row.config), "paper": row.paper,
        "paper_non_transductive": row.paper_non_transductive,
        "result": result, "wall_seconds": time.perf_counter() - started,
        "machine": machine(), "code": code,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "mlflow_run_id": result.get("mlflow_run_id"),
    }
    if queries is not None and result.get("split") == config.data.test_split:
        record["paper_queries"] = meta_test_on_paper_queries(config, result, queries)
    write_record(record, Path(result["run_dir"]), results)
    return record


def meta_test_on_paper_queries(config: Config, result: dict, queries: int) -> dict:
    """Meta-test the final model again, on the paper's queries per class. With batch
    statistics taken from the queries, their count moves the score; the row's main figure
    stays on our protocol's count."""
    again = result if queries == result["queries"] else evaluate_checkpoint(
        result["checkpoint"], episodes=result["episodes"], queries=queries,
        device=config.train.device)
    summary = {"queries": queries, **{k: again[k] for k in ("mean", "ci95", "episodes", "seed")}}
    if result.get("mlflow_run_id"):  # the record below holds it whatever MLflow says
        log_to_run(result["mlflow_tracking_uri"], result["mlflow_run_id"],
                   {"test_accuracy_paper_queries": again["mean"],
                    "test_accuracy_paper_queries_ci95": again["ci95"]},
                   {"paper_queries": queries})
    return summary


def write_record(record: dict, run_dir: Path, results: Path = RESULTS) -> Path:
    out = results / record["table"]
    out.mkdir(parents=True, exist_ok=True)
    history = run_dir / "history.json"
    if history.is_file():
        plot_curves(json.loads(history.read_text()), out / f"{record['row']}.png",
                    title=record["row"])
    path = out / f"{record['row']}.json"
    path.write_text(json.dumps(record, indent=2, default=str))
    return path


def machine() -> dict[str, Any]:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "torch": torch.__version__,
            # Which vector kernels torch dispatches to: two CPUs that differ here round
            # differently, so a re-run that moves can be told from one that should not.
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), **cpu_identity()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def cpu_identity(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """The CPU's model and its vector instruction sets (what oneDNN and MKL pick kernels
    by); `platform.processor()` is empty on Linux and a VM's model name is often generic."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor describes them all
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    isa = sorted(f for f in fields.get("flags", "").split()
                 if f.startswith(("avx", "amx", "fma")))
    return {"cpu_model": f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')}"
                         f", model {fields.get('model', '?')})",
            "cpu_isa": " ".join(isa)}


# -- docs/results.md ------------------------------------------------------------------


def render(tables: dict[str, list[Row]], results: Path = RESULTS, spec_path: Path = TABLES
           ) -> str:
    """Our numbers beside the papers', one table per data set; a row not yet run here
    says so and gives the command that runs it."""
    spec = yaml.safe_load(Path(spec_path).read_text())
    lines = [
        "# Reproducing the papers' tables",
        "",
        "Generated by `metadist reproduce` from `configs/reproduce/tables.yaml` and the records in",
        "`docs/results/`; do not edit by hand. Protocol for every number of ours: 600 test",
        "episodes fixed by `eval.seed` (2017), drawn only from the held-out test classes, 15",
        "queries per class, mean accuracy with its 95% confidence interval (1.96·std/√600);",
        "batch norm uses each episode's own statistics (**transductive**, as in Finn et al.'s",
        "MAML numbers and Nichol et al.'s transductive Reptile rows). *Budget* says how long",
        "the run was: `cpu` is the documented budget that fits the 2-core development",
        "machine, far shorter than the papers' runs (`full`, the command given), so a gap to",
        "the paper there measures the budget, not the implementation. *Train time* is the",
        "meta-training with its periodic validation; the 600-episode meta-test comes on top",
        "(a run resumed from a checkpoint: its time from that step on, as the column says).",
        "*Ours, paper's queries* is the same model meta-tested again on the same episodes'",
        "classes with the paper's own queries per class (Finn et al.'s code: as many as",
        "shots; Nichol et al.'s: one): with the queries' batch statistics that count moves",
        "the score, so this column is the like-for-like comparison and the main column is",
        "our protocol's. Its interval is wider: fewer queries are scored per episode. A",
        "dash: the record predates the column and its checkpoint is gone; re-running the",
        "row fills it.",
        "",
    ]
    for table, rows in tables.items():
        t = spec[table]
        lines += [f"## {t['title']}", "", f"Data: `{t['data']}`.", "",
                  "| split | setting | algorithm | ours (%) | ours, paper's queries (%) | "
                  "paper, transductive (%) | paper, non-transductive (%) | budget | steps | "
                  "train time | machine |",
                  "|---|---|---|---:|---:|---:|---:|---|---:|---:|---|"]
        curves = []
        for row in rows:
            record = load_record(row, results)
            paper = f"{row.paper:.2f}" if row.paper is not None else "—"
            paper_nt = (f"{row.paper_non_transductive:.2f}"
                        if row.paper_non_transductive is not None else "—")
            if record is None:
                lines.append(f"| {row.split} | {row.setting} | {row.algorithm} | not run here "
                             f"| | {paper} | {paper_nt} | `{row.command('full')}` | | | |")
                continue
            r = record["result"]
            minutes = r.get("train_seconds", record["wall_seconds"]) / 60
            # A resumed run timed only its own steps: say so rather than under-report.
            since = (f" from step {r['resumed_from_step']:,}"
                     if r.get("resumed_from_step") else "")
            m = record["machine"]
            where = m.get("gpu") or f"{m['cpus']}-core CPU"
            pq = record.get("paper_queries")
            theirs = (f"{100 * pq['mean']:.2f} ± {100 * pq['ci95']:.2f} ({pq['queries']}/class)"
                      if pq else "—")
            lines.append(
                f"| {row.split} | {row.setting} | {row.algorithm} | "
                f"**{100 * r['mean']:.2f} ± {100 * r['ci95']:.2f}** | {theirs} | {paper} | "
                f"{paper_nt} | "
                f"{record['budget']} | {r['steps']:,} | {minutes:.0f} min{since} | {where} |"
            )
            if (results / table / f"{row.id}.png").is_file():
                curves.append(row.id)
        lines += [""]
        # What a record says of its own run (a longer budget, a setting since changed).
        lines += [f"- `{row.id}`: {record['note']}" for row in rows
                  if (record := load_record(row, results)) is not None and record.get("note")]
        # Where our settings or data differ from a paper's, beyond the budget.
        if t.get("notes"):
            lines += [f"- {note.strip()}" for note in t["notes"]] + [""]
        if curves:
            lines += ["Learning curves (meta-training loss; training and validation "
                      "accuracy):", ""]
            lines += [f"![{c}](results/{table}/{c}.png)" for c in curves]
            lines += [""]
    lines += [
        "## Regenerating a row",
        "",
        "```bash",
        "metadist reproduce omniglot --rows omniglot-background-evaluation-5w1s-maml "
        "--budget cpu",
        "metadist reproduce miniimagenet --budget full        # every row, the papers' length",
        "metadist reproduce all --render-only                 # rebuild this page",
        "```",
        "",
        "Each run is also an MLflow run (tags `reproduce_table`, `reproduce_row`, `budget`).",
        "",
    ]
    return "\n".join(lines)


def load_record(row: Row, results: Path = RESULTS) -> dict | None:
    path = results / row.table / f"{row.id}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_report(tables: dict[str, list[Row]], results: Path = RESULTS,
                 report: Path = REPORT) -> Path:
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(render(tables, results))
    return report
