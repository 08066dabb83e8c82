"""`metadist reproduce`: every row of the papers' tables names a config that loads under
both budgets, a row runs and is recorded, and docs/results.md shows it beside the paper."""

from __future__ import annotations

import json

import pytest

from metadist.config import ConfigError
from metadist.launch import reproduce


def test_every_row_loads_under_both_budgets():
    tables = reproduce.load_rows()
    assert set(tables) == {"omniglot", "miniimagenet"}
    # Omniglot: 2 splits x {5,20}-way x {1,5}-shot x 6 algorithms; miniImageNet: 1 x 2 x 5.
    assert len(tables["omniglot"]) == 48 and len(tables["miniimagenet"]) == 10
    for row in tables["omniglot"] + tables["miniimagenet"]:
        for budget in reproduce.BUDGETS:
            config = reproduce.row_config(row, budget)
            assert config.algorithm.name == {"mamlpp": "maml"}.get(row.algorithm,
                                                                   row.algorithm)
            if row.algorithm == "mamlpp":  # MAML's config, MAML++'s switches on
                a = config.algorithm
                assert a.lslr and a.per_step_bn and a.outer_lr_schedule == "cosine"
                assert a.msl_steps == config.train.steps // 10
            assert config.data.ways == int(row.setting.split("w")[0])
            assert config.data.shots == int(row.setting.split("w")[1].rstrip("s"))
            assert config.data.dataset == row.dataset
        assert reproduce.row_config(row, "full").train.steps >= 50000
        # Finn et al.'s code tests on as many queries as shots, Nichol et al.'s on one;
        # Snell et al.'s and Li et al.'s are not compared (no second column).
        shots = reproduce.row_config(row, "cpu").data.shots
        expected = {"reptile": 1, "mamlpp": 1, "protonet": None,
                    "metasgd": None}.get(row.algorithm, shots)
        assert reproduce.paper_queries(row, shots) == expected


def test_a_bad_paper_queries_entry_names_the_row():
    row = reproduce.load_rows()["omniglot"][0]
    row.paper_queries = "two"
    with pytest.raises(ConfigError, match=f"paper_queries of {row.id} must be 'shots'"):
        reproduce.paper_queries(row, 1)


def test_paper_targets_are_the_published_ones():
    rows = {r.id: r for t in reproduce.load_rows().values() for r in t}
    assert rows["omniglot-1200-423-5w1s-maml"].paper == 98.7
    assert rows["omniglot-1200-423-20w5s-reptile"].paper_non_transductive == 96.65
    assert rows["miniimagenet-ravi-larochelle-5w5s-fomaml"].paper == 63.15
    assert rows["omniglot-1200-423-20w1s-protonet"].paper == 96.0
    assert rows["omniglot-1200-423-20w1s-metasgd"].paper == 95.93
    assert rows["miniimagenet-ravi-larochelle-5w1s-protonet"].paper == 49.42
    # The papers report the 1200/423 split only; the alphabet split has no paper figure.
    assert rows["omniglot-background-evaluation-5w1s-maml"].paper is None


def test_unknown_tables_rows_and_budgets_are_errors():
    tables = reproduce.load_rows()
    with pytest.raises(ConfigError, match="no table 'cifar'"):
        reproduce.select(tables, "cifar", None)
    with pytest.raises(ConfigError, match="unknown rows"):
        reproduce.select(tables, "omniglot", ["omniglot-5w1s-maml"])
    row = tables["omniglot"][0]
    with pytest.raises(ConfigError, match="--budget 'long'"):
        reproduce.row_config(row, "long")


def test_a_row_runs_is_recorded_and_rendered_beside_the_paper(tmp_path, omniglot_small):
    tables = reproduce.load_rows()
    row = reproduce.select(tables, "omniglot", ["omniglot-1200-423-5w1s-maml"])[0]
    results = tmp_path / "results"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    record = reproduce.run_row(row, "cpu", [
        f"data.dataset={omniglot_small}", "train.steps=3", "train.val_every=3",
        "train.val_episodes=4", "eval.episodes=12", "eval.batch_size=6", "model.hidden=8",
        "algorithm.meta_batch_size=2", "data.queries=2", "train.progress=false",
        "train.inner_loop=loop", f"tracking.tracking_uri={uri}", f"train.output_dir={tmp_path}",
    ], results=results)
    saved = json.loads((results / "omniglot" / f"{row.id}.json").read_text())
    assert saved["result"]["mean"] == record["result"]["mean"]
    assert saved["result"]["episodes"] == 12 and saved["result"]["split"] == "test"
    assert saved["paper"] == 98.7 and "train.steps=3" in saved["overrides"]
    # The budget's own train.steps is overridden, so the record lists only the one that ran.
    assert any(o.startswith("train.steps=") for o in row.budget["cpu"])
    assert [o for o in saved["overrides"] if o.startswith("train.steps=")] == ["train.steps=3"]
    from metadist.tracking import git_commit

    assert saved["code"]["commit"] == git_commit() and isinstance(
        saved["code"]["uncommitted"], list)
    assert saved["machine"]["cpu_capability"] in {"DEFAULT", "VSX", "Z VECTOR", "NO AVX",
                                                  "AVX2", "AVX512", "SVE256"}
    assert (results / "omniglot" / f"{row.id}.png").is_file()
    # Meta-tested again on Finn et al.'s count (1 query per class at 1 shot), same episodes.
    from metadist.training.evaluate import evaluate_checkpoint

    theirs = evaluate_checkpoint(record["result"]["checkpoint"], episodes=12, queries=1)
    assert saved["paper_queries"] == {"queries": 1, "mean": theirs["mean"],
                                      "ci95": theirs["ci95"], "episodes": 12, "seed": 2017}
    assert theirs["queries"] == 1 and record["result"]["queries"] == 2
    from mlflow import MlflowClient

    run = MlflowClient(uri).get_run(saved["mlflow_run_id"])
    assert run.data.tags["reproduce_row"] == row.id and run.data.params["paper_queries"] == "1"
    assert run.data.tags["git_commit"] == saved["code"]["commit"]
    assert run.data.tags["git_uncommitted"] == (", ".join(saved["code"]["uncommitted"])
                                               or "none")
    assert run.data.metrics["test_accuracy_paper_queries"] == pytest.approx(theirs["mean"])

    page = reproduce.render(tables, results)
    line = next(x for x in page.splitlines() if x.startswith("| 1200-423 | 5w1s | maml |"))
    r = record["result"]
    assert f"**{100 * r['mean']:.2f} ± {100 * r['ci95']:.2f}**" in line
    assert "| 98.70 |" in line and "| 3 |" in line
    pq = saved["paper_queries"]
    assert f"| {100 * pq['mean']:.2f} ± {100 * pq['ci95']:.2f} (1/class) |" in line
    other = next(x for x in page.splitlines() if x.startswith("| 1200-423 | 20w5s | reptile |"))
    assert "not run here" in other and "--budget full" in other
    assert f"results/omniglot/{row.id}.png" in page
    assert "- Reptile: " in page  # the differences from the papers are on the page
    assert f"`{row.id}`" not in page
    saved["note"] = "ran 4,000 steps"  # a record's own note is printed under its table
    (results / "omniglot" / f"{row.id}.json").write_text(json.dumps(saved))
    assert f"- `{row.id}`: ran 4,000 steps" in reproduce.render(tables, results)
    # A resumed run timed only its own steps, and its row says where they began.
    assert "from step" not in line
    saved["result"]["resumed_from_step"] = 2
    (results / "omniglot" / f"{row.id}.json").write_text(json.dumps(saved))
    page = reproduce.render(tables, results)
    line = next(x for x in page.splitlines() if x.startswith("| 1200-423 | 5w1s | maml |"))
    assert " min from step 2 |" in line


def test_the_cpu_a_row_ran_on_is_named_by_its_vector_instruction_sets(tmp_path):
    # Re-runs of one config reproduce to the last digit on one kind of CPU and move on
    # another; the record has to say which kind it ran on.
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\ncpu family\t: 6\nmodel\t\t: 143\n"
        "model name\t: Intel(R) Xeon(R) Platinum 8480+\n"
        "flags\t\t: fpu sse4_2 avx2 fma avx512f amx_tile\n\n"
        "processor\t: 1\nmodel name\t: some other core\nflags\t\t: avx\n")
    assert reproduce.cpu_identity(cpuinfo) == {
        "cpu_model": "Intel(R) Xeon(R) Platinum 8480+ (family 6, model 143)",
        "cpu_isa": "amx_tile avx2 avx512f fma"}
    assert reproduce.cpu_identity(tmp_path / "absent") == {}
