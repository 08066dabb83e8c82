"""Our reproduction rows meta-tested on the papers' number of queries per class.

Our protocol tests every row on 15 queries per class. The papers' code does not: Finn et
al.'s MAML code tests on as many queries per class as shots (`DataGenerator(
update_batch_size*2)` at test, Omniglot and miniImageNet alike), and Nichol et al.'s
Reptile code on one (`_split_train_test(..., test_shots=1)`). With transductive batch norm
the queries' count sets the batch the test statistics come from, so it moves the score.
This re-tests each recorded row's final checkpoint (same 600 seeded episodes' classes, same
`eval.seed`) on the paper's count (`paper_queries` in configs/reproduce/tables.yaml),
beside the recorded 15-query result. `metadist reproduce` does the same for every row it
runs; `--record` writes these results into records that predate that:

    python benchmarks/paper_test_queries.py [--rows ROW,...] [--record] > RESULTS.md

Rows whose checkpoint is no longer on disk are listed as such.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=None, help="comma-separated row ids (default: all)")
    parser.add_argument("--results", default=str(ROOT / "docs" / "results"))
    parser.add_argument("--record", action="store_true",
                        help="also write each result into its row's record")
    args = parser.parse_args()
    from metadist.launch import reproduce
    from metadist.training.evaluate import evaluate_checkpoint

    rows = {r.id: r for t in reproduce.load_rows().values() for r in t}

    torch.set_num_threads(1)
    wanted = set(args.rows.split(",")) if args.rows else None
    paths = sorted(Path(args.results).glob("*/*.json"))
    started = time.perf_counter()
    lines = []
    for path in paths:
        rec = json.loads(path.read_text())
        if wanted is not None and rec["row"] not in wanted:
            continue
        res = rec["result"]
        queries = reproduce.paper_queries(rows[rec["row"]], res["shots"])
        ours = f"{100 * res['mean']:.2f} ± {100 * res['ci95']:.2f}"
        paper = f"{rec['paper']:.2f}" if rec.get("paper") is not None else "—"
        checkpoint = ROOT / res["checkpoint"]
        if not checkpoint.is_file():
            lines.append(f"| {rec['row']} | {res['steps']:,} | {ours} | {queries} | checkpoint "
                         f"no longer on disk | | {paper} |")
            continue
        t0 = time.perf_counter()
        again = evaluate_checkpoint(str(checkpoint), episodes=res["episodes"], queries=queries,
                                    device="cpu")
        minutes = (time.perf_counter() - t0) / 60
        print(f"{rec['row']}: {100 * again['mean']:.2f} ({minutes:.1f} min)", file=sys.stderr,
              flush=True)
        if args.record:
            rec["paper_queries"] = {
                "queries": queries, **{k: again[k] for k in ("mean", "ci95", "episodes", "seed")},
                "source": "benchmarks/paper_test_queries.py on the record's final checkpoint"}
            path.write_text(json.dumps(rec, indent=2, default=str))
        diff = 100 * (again["mean"] - res["mean"])
        lines.append(f"| {rec['row']} | {res['steps']:,} | {ours} | {queries} | "
                     f"**{100 * again['mean']:.2f} ± {100 * again['ci95']:.2f}** | "
                     f"{diff:+.2f} | {paper} |")

    print("# Our rows tested on the papers' queries per class\n")
    print(f"Command: `python benchmarks/paper_test_queries.py {' '.join(sys.argv[1:])}`. "
          f"Machine: {platform.machine()}, CPU, 1 torch thread; torch {torch.__version__}, "
          f"Python {platform.python_version()}. Whole run "
          f"{(time.perf_counter() - started) / 60:.0f} min.\n")
    print("Each row's final checkpoint (the record's), meta-tested again on the test split: "
          "600 episodes, `eval.seed` 2017, 95% CI, transductive batch norm (the queries' own "
          "statistics), only the queries per class changed: as many as shots for MAML and "
          "first-order MAML (Finn et al.'s code), 1 for Reptile (Nichol et al.'s).\n")
    print("| row | steps | ours, 15 queries (%) | paper's queries | ours, paper's queries (%) "
          "| change (points) | paper, transductive (%) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
