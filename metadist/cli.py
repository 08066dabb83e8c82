"""The ``metadist`` command: argument parsing and dispatch only. Each command calls the
library function that does the work (``metadist.launch``, ``metadist.training``,
``metadist.data.ingest``) and prints what it returns.

Commands import their launcher when they run, so that ``metadist --help`` and the data
tools do not pay for importing torch, Ray and MLflow.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from metadist.config import ConfigError, load_config, resolve_config
from metadist.launch.cluster import STATE_ENV, ClusterError
from metadist.tracking import TrackingError
from metadist.training.signals import sigterm_unwinds


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with sigterm_unwinds():
            return args.func(args)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, TrackingError,
            ClusterError) as err:
        print(f"metadist: error: {err}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metadist", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="meta-train from a YAML config, then meta-test")
    p.__class__ = _Intermixed  # options may come after the overrides
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    p.add_argument("--resume", help="continue from this checkpoint (same as resume=PATH)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pretrain", help="supervised pre-training of the backbone on every "
                       "training class (the config's pretrain: section), then meta-test it "
                       "with a prototype head")
    p.__class__ = _Intermixed  # options may come after the overrides
    p.add_argument("config", help="YAML config (see configs/*_pretrain_*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. pretrain.epochs=10")
    p.add_argument("--resume", help="continue from this pre-training checkpoint")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("tune", help="sweep the config's tune.space with Ray Tune, then "
                       "meta-test and register the best")
    p.__class__ = _Intermixed  # options may come after the overrides
    p.add_argument("config", help="YAML config with a tune: section (see configs/tune_*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. tune.num_samples=16")
    p.add_argument("--resume", action="store_true",
                   help="finish a sweep that was interrupted (same config and overrides)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("reproduce", help="run rows of the papers' tables "
                       "(configs/reproduce/tables.yaml) and regenerate docs/results.md")
    p.__class__ = _Intermixed  # options may come after the overrides
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
    p.add_argument("--ways", type=int, help="classes per test episode (default: the config's "
                   "data.ways; another count needs a head built per task: protonet, "
                   "algorithm.head_init)")
    p.add_argument("--shots", type=int, help="support examples per class (default: the "
                   "config's data.shots)")
    p.add_argument("--metric", choices=["euclidean", "cosine"],
                   help="a protonet's (or a pre-trained backbone's) prototypes: squared "
                   "Euclidean distances or cosine similarities (default: the config's "
                   "algorithm.metric)")
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
    add_cluster_commands(sub)
    add_job_commands(sub)
    add_serve_command(sub)
    return parser


# -- train, tune, reproduce, eval ---------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from metadist.launch.run import tracked_training

    config = load_config(resolve_config(args.config), args.overrides)
    if args.resume:
        config.resume = args.resume
    print_result(tracked_training(config))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from metadist.launch.run import tracked_pretraining

    config = load_config(resolve_config(args.config), args.overrides)
    if args.resume:
        config.resume = args.resume
    print_result(tracked_pretraining(config))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from metadist.launch.sweep import run_sweep

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
    from metadist.launch import reproduce

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


def cmd_eval(args: argparse.Namespace) -> int:
    from metadist.training.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint, episodes=args.episodes, split=args.split, dataset=args.dataset,
        inner_steps=args.inner_steps, queries=args.queries, ways=args.ways, shots=args.shots,
        metric=args.metric,
    )
    print_result(result)
    return 0


def print_result(result: dict) -> None:
    metric = result["metric"]
    print(
        f"meta-test {metric}: {result['mean']:.4f} ± {result['ci95']:.4f} (95% CI, "
        f"{result['episodes']} episodes of the {result.get('split', 'test')} split)"
    )
    print(json.dumps(result, indent=2))


# -- data ------------------------------------------------------------------------------------


def cmd_convert(args: argparse.Namespace) -> int:
    from metadist.data.ingest import convert_imagefolder, convert_miniimagenet, convert_omniglot

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
    from metadist.data.ingest import make_synthetic

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


# -- cluster up / down / status --------------------------------------------------------------


def add_cluster_commands(sub: Any) -> None:
    p = sub.add_parser("cluster", help="start or stop a local multi-node Ray cluster")
    cmds = p.add_subparsers(dest="cluster_command", required=True)
    u = cmds.add_parser("up", help="start a head and N worker nodes on 127.0.0.1")
    u.add_argument("--local", action="store_true", required=True,
                   help="on this machine (the only kind metadist starts itself)")
    u.add_argument("--nodes", type=int, default=2, help="worker nodes besides the head")
    u.add_argument("--cpus", type=float, default=2, help="CPUs of each worker node")
    u.add_argument("--head-cpus", type=float, default=0,
                   help="CPUs of the head (default 0: it runs drivers, not workers)")
    u.add_argument("--object-store-mb", type=int, default=512, help="per node")
    u.add_argument("--port", type=int, help="GCS port (default 6379, or a free one)")
    u.add_argument("--dashboard-port", type=int, help="default 8265, or a free one")
    u.add_argument("--state", help=f"state file (default ${STATE_ENV} or "
                   "~/.metadist/local-cluster.json)")
    u.set_defaults(func=cmd_cluster_up)
    d = cmds.add_parser("down", help="stop exactly the processes `up` started")
    d.add_argument("--state", help="state file")
    d.add_argument("--keep-temp", action="store_true", help="keep Ray's logs and temp dir")
    d.set_defaults(func=cmd_cluster_down)
    s = cmds.add_parser("status", help="the recorded cluster's nodes, alive or not")
    s.add_argument("--state", help="state file")
    s.set_defaults(func=cmd_cluster_status)


def cmd_cluster_up(args: Any) -> int:
    from metadist.launch import cluster

    cluster.up(nodes=args.nodes, cpus=args.cpus, head_cpus=args.head_cpus,
               object_store_mb=args.object_store_mb, port=args.port,
               dashboard_port=args.dashboard_port, state=args.state)
    return 0


def cmd_cluster_down(args: Any) -> int:
    from metadist.launch import cluster

    cluster.down(args.state, keep_temp=args.keep_temp)
    return 0


def cmd_cluster_status(args: Any) -> int:
    from metadist.launch import cluster

    print(cluster.status(args.state))
    return 0


# -- submit / jobs ---------------------------------------------------------------------------


class _Intermixed(argparse.ArgumentParser):
    """Takes options among the positionals: ``submit CONFIG --address URL key=value``."""

    _plain = False

    def parse_known_args(self, args=None, namespace=None):
        if self._plain:
            return super().parse_known_args(args, namespace)
        self._plain = True  # the intermixed parse calls this (twice) for its passes
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._plain = False


def add_job_commands(sub: Any) -> None:
    p = sub.add_parser("submit", help="run a config on a Ray cluster (Ray Jobs API) and "
                       "follow its log")
    p.__class__ = _Intermixed  # the subparsers action creates plain parsers
    p.add_argument("config", help="YAML config inside the working directory (shipped)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. workers=2")
    p.add_argument("--tune", action="store_true", help="run `metadist tune` instead of train")
    p.add_argument("--working-dir", type=Path, default=None,
                   help="directory shipped to the cluster as the job's working directory; "
                   "the config must be inside it (default: the current directory)")
    _connection_args(p)
    p.add_argument("--mlflow-uri", help="tracking URI for the run (default: on the local "
                   "cluster yours, else the cluster's $MLFLOW_TRACKING_URI)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job (repeatable)")
    p.add_argument("--pip", action="store_true",
                   help="have Ray install metadist's dependencies for the job, pinned to the "
                   "versions installed here (off by default: the cluster's image has them, "
                   "and an offline cluster could not download them)")
    p.add_argument("--requirements", metavar="FILE",
                   help="have Ray install the packages of this requirements file instead")
    p.add_argument("--no-follow", action="store_true", help="print the job id and return")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", help="list, inspect, follow or stop jobs on a Ray cluster")
    _connection_args(p)
    p.set_defaults(func=cmd_jobs)
    cmds = p.add_subparsers(dest="jobs_command")
    c = cmds.add_parser("list", help="every job: id, status, start, entrypoint")
    _connection_args(c)
    for name, text in (("status", "status and message of a job"),
                       ("logs", "a job's log so far"), ("stop", "stop a running job")):
        c = cmds.add_parser(name, help=text)
        c.add_argument("job_id")
        _connection_args(c)
        if name == "logs":
            c.add_argument("--follow", "-f", action="store_true", help="until the job ends")
        if name == "stop":
            c.add_argument("--no-wait", action="store_true", help="do not wait until stopped")


def _connection_args(p: Any) -> None:
    # SUPPRESS: a flag given before the subcommand (`jobs --address X status ID`) is not
    # reset by the subcommand's own default.
    p.add_argument("--address", default=argparse.SUPPRESS,
                   help="job API, e.g. http://127.0.0.1:8265 (default: $RAY_API_SERVER_ADDRESS,"
                   " an http $RAY_ADDRESS, or the cluster from `metadist cluster up --local`)")
    p.add_argument("--token-file", default=argparse.SUPPRESS,
                   help="Ray auth token (default: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, "
                   "~/.ray/auth_token)")


def cmd_submit(args: Any) -> int:
    from metadist.launch.jobs import submit

    jobs, job_id, entrypoint = submit(
        args.config, args.overrides, tune=args.tune, address=getattr(args, "address", None),
        token_file=getattr(args, "token_file", None), working_dir=args.working_dir,
        mlflow_uri=args.mlflow_uri, env=args.env, pip=args.pip,
        requirements=args.requirements,
    )
    print(f"submitted {job_id} to {jobs.address}: {entrypoint}", flush=True)
    if args.no_follow:
        print(f"follow it with: metadist jobs logs {job_id} --follow")
        return 0
    return _follow_to_end(jobs, job_id)


def _follow_to_end(jobs, job_id: str) -> int:
    try:
        status = jobs.follow(job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running: metadist jobs stop {job_id}",
              file=sys.stderr)
        return 130
    info = jobs.info(job_id)
    print(f"job {job_id}: {status}" + (f" ({info.message})" if status != "SUCCEEDED"
                                       and info.message else ""), file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def cmd_jobs(args: Any) -> int:
    from metadist.launch.jobs import Jobs

    jobs = Jobs(getattr(args, "address", None), getattr(args, "token_file", None))
    if args.jobs_command in (None, "list"):  # bare `metadist jobs` lists
        rows = sorted(jobs.list(), key=lambda j: j.start_time or 0)
        print(f"{'job id':<30} {'status':<10} {'started':<19}  entrypoint")
        for j in rows:
            started = (datetime.fromtimestamp(j.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S")
                       if j.start_time else "")
            print(f"{j.submission_id or j.job_id:<30} {j.status:<10} {started:<19}  "
                  f"{_short(j.entrypoint)}")
        return 0
    if args.jobs_command == "status":
        info = jobs.info(args.job_id)
        print(f"{args.job_id}: {info.status}")
        if info.message:
            print(info.message)
        return 0 if info.status not in ("FAILED", "STOPPED") else 1
    if args.jobs_command == "logs":
        if args.follow:
            return _follow_to_end(jobs, args.job_id)
        print(jobs.logs(args.job_id), end="")
        return 0
    jobs.stop(args.job_id)  # "stop"
    if not args.no_wait:
        deadline = time.time() + 60
        while not jobs.status(args.job_id).is_terminal() and time.time() < deadline:
            time.sleep(0.5)
    print(f"{args.job_id}: {jobs.status(args.job_id)}")
    return 0


# -- serve -----------------------------------------------------------------------------------


def add_serve_command(sub: Any) -> None:
    p = sub.add_parser("serve", help="answer few-shot tasks over HTTP (Ray Serve) with a "
                       "trained model, until Ctrl-C")
    p.add_argument("model_uri", metavar="MODEL_URI", help="a checkpoint file, or an MLflow "
                   "model: models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/model")
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP server listens on "
                   "(default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--replicas", type=int, default=1, help="replicas, 1 CPU each (default 1)")
    p.add_argument("--max-batch-size", type=int, default=16,
                   help="tasks of concurrent requests answered as one batch (default 16)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long a batch waits to fill (default 5)")
    p.add_argument("--cache-mb", type=float, default=256.0, help="adapted models kept per "
                   "replica for repeated support sets, in MB (default 256; 0: none)")
    p.add_argument("--address", help="a Ray cluster's address (HOST:6379, ray://HOST:10001) "
                   "to serve on (default: $RAY_ADDRESS, else a local Ray on 127.0.0.1)")
    p.add_argument("--token-file", help="the cluster's Ray auth token (default: "
                   "$RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: Any) -> int:
    from metadist.launch.serve import serve_model

    return serve_model(
        args.model_uri, host=args.host, port=args.port, replicas=args.replicas,
        max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
        cache_mb=args.cache_mb, address=args.address, token_file=args.token_file,
    )


def _short(text: str | None, width: int = 90) -> str:
    text = text or ""
    return text if len(text) <= width else text[: width - 3] + "..."


if __name__ == "__main__":
    sys.exit(main())
