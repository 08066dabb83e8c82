"""How well a model meta-trained on 5-way tasks adapts to 20-way ones, beside one
meta-trained on 20-way tasks: prototypical networks (a head built from each support
set, so any number of classes), on real Omniglot, the same steps for both.

Both train from `configs/omniglot_20w1s_protonet.yaml` with `data.train_ways` set to 5
and to 20 (1 shot, 5 queries per class, one episode a step) and are meta-tested on the
same 600 20-way 1-shot episodes of the held-out test characters (15 queries per class,
95% CI), as `metadist eval CHECKPOINT --ways 20` does (the Learner's path; tests pin
that the two score the same task the same).

    python benchmarks/any_way_adaptation.py [--steps 1500] [--dataset data/omniglot-1200-423]

Results: benchmarks/results/any_way_adaptation.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from metadist.config import load_config
from metadist.launch.reproduce import machine
from metadist.training.evaluate import evaluate_checkpoint
from metadist.training.loop import train

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--dataset", default=str(ROOT / "data" / "omniglot-1200-423"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for ways in (5, 20):
            config = load_config(ROOT / "configs" / "omniglot_20w1s_protonet.yaml", [
                f"data.dataset={args.dataset}", f"data.train_ways={ways}",
                f"train.steps={args.steps}", "train.val_every=0", "train.final_test=false",
                "train.val_episodes=1", "tracking.enabled=false", "train.progress=false",
                f"train.output_dir={out}"])
            result = train(config)
            test = evaluate_checkpoint(result["checkpoint"], ways=20)
            rows.append((ways, result["train_seconds"], test))
            print(f"trained {ways}-way: 20-way test {100 * test['mean']:.2f} ± "
                  f"{100 * test['ci95']:.2f}%", flush=True)
    lines = [
        "# A 5-way-trained model on 20-way tasks",
        "",
        "`python benchmarks/any_way_adaptation.py --steps "
        f"{args.steps}`: prototypical networks (Conv4-64, max-pool) on "
        f"`{Path(args.dataset).name}`, {args.steps} meta-steps of one 1-shot episode (5 "
        "queries per class) each, Adam 0.001 annealed to 0.0001; meta-tested on the same "
        "600 20-way 1-shot episodes of the held-out test characters, 15 queries per class, "
        "mean accuracy with its 95% CI, transductive batch norm.",
        "",
        "| meta-trained on | 20-way 1-shot test accuracy (%) | train time |",
        "|---|---:|---:|",
    ]
    for ways, seconds, test in rows:
        lines.append(f"| {ways}-way episodes | {100 * test['mean']:.2f} ± "
                     f"{100 * test['ci95']:.2f} | {seconds / 60:.1f} min |")
    lines += ["", f"Machine: `{json.dumps(machine())}`.", "", "Protocol of the test:", "",
              "```json", json.dumps({k: rows[0][2][k] for k in (
                  "dataset", "split", "ways", "shots", "queries", "episodes", "seed")},
                  indent=2), "```", ""]
    path = ROOT / "benchmarks" / "results" / "any_way_adaptation.md"
    path.write_text("\n".join(lines))
    print(path.read_text())


if __name__ == "__main__":
    main()
