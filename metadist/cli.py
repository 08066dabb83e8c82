"""The ``metadist`` command: train, tune, eval, data convert."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from metadist.cluster import ClusterError, add_cluster_commands
from metadist.config import ConfigError, uses_ray
from metadist.jobs import add_job_commands
from metadist.signals import sigterm_unwinds


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from metadist.tracking import TrackingError

    try:
        with sigterm_unwinds():
            return args.func(args)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, TrackingError,
            ClusterError) as err:
        print(f"metadist: error: {err}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metadist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="meta-train from a YAML config, then meta-test")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    p.add_argument("--resume", help="continue from this checkpoint (same as resume=PATH)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", help="sweep the config's tune.space with Ray Tune, then "
                       "meta-test and register the best")
    p.add_argument("config", help="YAML config with a tune: section (see configs/tune_*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. tune.num_samples=16")
    p.add_argument("--resume", action="store_true",
                   help="finish a sweep that was interrupted (same config and overrides)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("reproduce", help="run rows of the papers' tables "
                       "(configs/reproduce/tables.yaml) and regenerate docs/results.md")
    p.add_argument("table", help="omniglot, miniimagenet or all")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every row")
    p.add_argument("--rows", help="comma-separated row ids (default: every row of the table)")
    p.add_argument("--budget", default="cpu", help="cpu (this machine's documented budget) "
                   "or full (the papers' length)")
    p.add_argument("--dry-run", action="store_true", help="print each row's config, run nothing")
    p.add_argument("--render-only", action="store_true", help="only regenerate docs/results.md")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("eval", help="meta-test a checkpoint on held-out classes")
    p.add_argument("checkpoint")
    p.add_argument("--episodes", type=int, help="number of test episodes (default: config's)")
    p.add_argument("--split", help="split to test on (default: the config's test split)")
    p.add_argument("--dataset", help="dataset directory (default: the one trained on)")
    p.add_argument("--inner-steps", type=int, help="inner steps at test time")
    p.add_argument("--queries", type=int,
                   help="query examples per class in each test episode (default: the "
                        "config's data.queries)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("data", help="convert datasets to metadist's Parquet episode store")
    data = p.add_subparsers(dest="data_command", required=True)
    c = data.add_parser("convert", help="convert a dataset layout to Parquet shards")
    c.add_argument("format", choices=["omniglot", "miniimagenet", "imagefolder"])
    c.add_argument("src")
    c.add_argument("out")
    c.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    c.add_argument("--split", default="background-evaluation",
                   choices=["background-evaluation", "1200-423"], help="omniglot class split")
    c.add_argument("--background", default="background",
                   choices=["background", "small1", "small2"], help="omniglot training set")
    c.add_argument("--val-classes", type=int, default=100, help="omniglot validation classes")
    c.add_argument("--no-rotations", action="store_true",
                   help="omniglot: do not add 90/180/270-degree rotations as classes")
    c.add_argument("--val-fraction", type=float, default=0.15, help="imagefolder")
    c.add_argument("--test-fraction", type=float, default=0.2, help="imagefolder")
    c.add_argument("--seed", type=int, default=0, help="seed of the class split")
    c.set_defaults(func=cmd_convert)
    s = data.add_parser("synthetic", help="generate a SYNTHETIC dataset for scale tests")
    s.add_argument("out")
    s.add_argument("--classes", type=int, default=100)
    s.add_argument("--images-per-class", type=int, default=20)
    s.add_argument("--image-size", type=int, default=28)
    s.add_argument("--channels", type=int, default=1, choices=[1, 3])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_synthetic)
    add_cluster_commands(sub)  # cluster up/down/status
    add_job_commands(sub)  # submit, jobs
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from metadist.config import load_config

    config = load_config(resolve_config(args.config), args.overrides)
    if args.resume:
        config.resume = args.resume
    print_result(tracked_training(config))
    return 0


def tracked_training(config, tags: dict[str, str] | None = None) -> dict:
    """One MLflow run (unless tracking is off) around ``run_training``."""
    tracker = None
    if config.tracking.enabled:
        from metadist.tracking import MLflowTracker

        # Fails here, before any compute, if the store is unreachable.
        tracker = MLflowTracker(config, tags=tags)
    with tracker or contextlib.nullcontext():
        result = run_training(config, tracker)
        if tracker is not None:
            result["mlflow_run_id"] = tracker.run_id
            result["mlflow_tracking_uri"] = tracker.uri
    return result


def cmd_tune(args: argparse.Namespace) -> int:
    from metadist.config import load_config
    from metadist.sweep import run_sweep

    # `metadist tune CONFIG ... resume` reads as well as `--resume`.
    resume = args.resume or "resume" in args.overrides
    overrides = [o for o in args.overrides if o != "resume"]
    config = load_config(resolve_config(args.config), overrides)
    summary = run_sweep(config, resume=resume)
    print(json.dumps({k: v for k, v in summary.items() if k != "trials"}, indent=2, default=str))
    test = summary.get("test")
    print(f"best trial {summary['best_trial']}: {summary['metric']} "
          f"{summary['best_' + summary['metric']]:.4f}; config written to "
          f"{summary['best_config']}")
    if test is not None:
        print(f"meta-test {test['metric']} of the best config: {test['mean']:.4f} ± "
              f"{test['ci95']:.4f} (95% CI, {test['episodes']} episodes of the "
              f"{test['split']} split)")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from metadist import reproduce

    tables = reproduce.load_rows()
    rows = reproduce.select(tables, args.table, args.rows.split(",") if args.rows else None)
    for row in [] if args.render_only else rows:
        config = reproduce.row_config(row, args.budget, args.overrides)  # checks every row
        if args.dry_run:
            print(f"{row.id}: {row.config} " + " ".join(
                [*row.overrides, *row.budget[args.budget], *args.overrides]))
            print(f"  steps={config.train.steps} dataset={config.data.dataset}")
            continue
        record = reproduce.run_row(row, args.budget, args.overrides)
        r = record["result"]
        print(f"{row.id}: {100 * r['mean']:.2f} ± {100 * r['ci95']:.2f} % "
              f"(paper: {row.paper if row.paper is not None else '—'})")
    if not args.dry_run:
        print(f"wrote {reproduce.write_report(tables)}")
    return 0


def run_training(config, tracker) -> dict:
    """In this process, or on Ray Train when ``workers > 1`` (or ``ray.enabled=true``)."""
    if not uses_ray(config):
        from metadist.train import train

        return train(config, tracker)
    from metadist.ray_train import train_on_ray

    return train_on_ray(
        config,
        mlflow_run_id=tracker.run_id if tracker is not None else None,
        tracking_uri=tracker.uri if tracker is not None else None,
    )


def cmd_eval(args: argparse.Namespace) -> int:
    from metadist.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint, episodes=args.episodes, split=args.split, dataset=args.dataset,
        inner_steps=args.inner_steps, queries=args.queries,
    )
    print_result(result)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from metadist.data import convert_imagefolder, convert_miniimagenet, convert_omniglot

    if args.format == "omniglot":
        out = convert_omniglot(
            args.src, args.out, split=args.split, val_classes=args.val_classes, seed=args.seed,
            background=args.background, rotations=not args.no_rotations,
            overwrite=args.overwrite,
        )
    elif args.format == "miniimagenet":
        out = convert_miniimagenet(args.src, args.out, overwrite=args.overwrite)
    else:
        out = convert_imagefolder(
            args.src, args.out, val_fraction=args.val_fraction,
            test_fraction=args.test_fraction, seed=args.seed, overwrite=args.overwrite,
        )
    print(describe_dataset(out))
    return 0


def cmd_synthetic(args: argparse.Namespace) -> int:
    from metadist.data import make_synthetic

    out = make_synthetic(
        args.out, classes=args.classes, images_per_class=args.images_per_class,
        image_size=args.image_size, channels=args.channels, seed=args.seed,
        overwrite=args.overwrite,
    )
    print(describe_dataset(out))
    return 0


def describe_dataset(out: Path) -> str:
    from metadist.data import DatasetInfo, Manifest

    info = DatasetInfo.load(Path(out) / "dataset.json")
    lines = [f"wrote {out} ({info.dataset})"]
    for split in info.splits:
        m = Manifest.load(Path(out) / split / "manifest.json")
        images = sum(c.count for c in m.classes)
        rot = f" x {len(m.rotations)} rotations" if len(m.rotations) > 1 else ""
        lines.append(f"  {split}: {len(m.classes)} classes{rot}, {images} images")
    return "\n".join(lines)


def resolve_config(name: str) -> Path:
    """A path, or the name of a file in ./configs (``omniglot_5w1s_maml``)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (Path("configs") / name, Path("configs") / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"config not found: {name}")


def print_result(result: dict) -> None:
    metric = result["metric"]
    print(
        f"meta-test {metric}: {result['mean']:.4f} ± {result['ci95']:.4f} (95% CI, "
        f"{result['episodes']} episodes of the {result.get('split', 'test')} split)"
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
