"""Runs on a Ray cluster through the Ray Jobs API: ``metadist submit`` and ``metadist jobs``.

A submitted run is ``python -m metadist.cli train CONFIG key=value ...`` (or ``tune``)
executed on the cluster's head in a copy of this repository (the runtime environment's
``working_dir``); the config is checked here first, so a bad config never reaches the
cluster. Ray's token authentication stays on: every request carries the token
(``--token-file``, ``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shlex
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from metadist.cluster import ClusterError, LocalCluster, load_state, token_source


def _checkout() -> Path:
    """The repository this metadist runs from (an editable install), else the current
    directory: what a job's working directory is a copy of."""
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").is_file() and (repo / "configs").is_dir():
        return repo
    return Path.cwd()


ROOT = _checkout()
# Never shipped: environments, data, outputs (Ray also skips what .gitignore lists).
# Anchored with "/": a bare "data" would also drop the package metadist/data.
EXCLUDES = ["/.venv", "/.git", "/data", "/runs", "/mlruns", "/mlartifacts", "/mlflow.db",
            "/logs", "*.egg-info", "__pycache__"]
# Seconds between `jobs stop`'s SIGTERM and its SIGKILL (RAY_JOB_STOP_WAIT_TIME_S).
STOP_GRACE_S = "30"


# --- token and address ---------------------------------------------------------------


def read_token(token_file: str | None = None) -> tuple[str | None, str]:
    """The token and where it came from (for messages); (None, ...) when there is none."""
    if token_file:
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--token-file {path}: no such file")
        if not path.read_text().strip():
            raise ValueError(f"--token-file {path} is empty")
        return path.read_text().strip(), str(path)
    source = token_source()
    if source is None:
        return None, "nowhere (no $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
    if source == "RAY_AUTH_TOKEN":
        return os.environ["RAY_AUTH_TOKEN"].strip(), "$RAY_AUTH_TOKEN"
    return Path(source).read_text().strip() or None, source


def resolve_address(address: str | None = None) -> tuple[str, LocalCluster | None]:
    """``--address``, else ``$RAY_API_SERVER_ADDRESS`` / an http ``$RAY_ADDRESS``, else the
    local cluster's; with the local cluster when the address is its job server."""
    local = load_state()
    address = (address or os.environ.get("RAY_API_SERVER_ADDRESS")
               or (os.environ.get("RAY_ADDRESS", "") if
                   os.environ.get("RAY_ADDRESS", "").startswith("http") else None)
               or (local.dashboard_url if local else None))
    if not address:
        raise ClusterError(
            "no Ray cluster to talk to: pass --address http://HOST:8265 (the dashboard's "
            "job API), set RAY_API_SERVER_ADDRESS, or start one with "
            "`metadist cluster up --local`"
        )
    if "://" not in address:
        address = f"http://{address}"
    address = address.rstrip("/")
    return address, local if local and local.dashboard_url == address else None


class Jobs:
    """``JobSubmissionClient`` with errors that say what to do."""

    def __init__(self, address: str | None = None, token_file: str | None = None) -> None:
        from ray.job_submission import JobSubmissionClient

        self.address, self.local = resolve_address(address)
        token, self.token_from = read_token(token_file)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with self.errors():
            self.client = JobSubmissionClient(self.address, headers=headers)

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError as err:
            refused = "invalid token" if "Forbidden" in str(err) else "no token"
            raise ClusterError(
                f"the Ray job server at {self.address} refused the request ({refused}; "
                f"token taken from {self.token_from}). The token is the cluster's "
                "~/.ray/auth_token (`ray get-auth-token` on the head prints it): pass "
                "--token-file FILE, or set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH"
            ) from None
        except ConnectionError as err:
            raise ClusterError(
                f"cannot reach the Ray job server at {self.address} ({err}); is the cluster "
                "up (`metadist cluster status`, `metadist cluster up --local`)?"
            ) from None
        except ClusterError:
            raise
        except RuntimeError as err:  # Ray's "Request failed with status code 404: ..."
            raise ClusterError(f"{self.address}: {err}") from None

    def submit(self, entrypoint: str, runtime_env: dict[str, Any],
               submission_id: str | None = None, metadata: dict[str, str] | None = None) -> str:
        with self.errors():
            return self.client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                          submission_id=submission_id, metadata=metadata)

    def info(self, job_id: str):
        with self.errors():
            return self.client.get_job_info(job_id)

    def status(self, job_id: str):
        with self.errors():
            return self.client.get_job_status(job_id)

    def list(self) -> list:
        with self.errors():
            return self.client.list_jobs()

    def logs(self, job_id: str) -> str:
        with self.errors():
            return self.client.get_job_logs(job_id)

    def stop(self, job_id: str) -> bool:
        with self.errors():
            return self.client.stop_job(job_id)

    def follow(self, job_id: str, out=None) -> Any:
        """Print the job's log as it grows until the job ends; return its final status."""
        out = out or sys.stdout

        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(job_id):
                out.write(chunk)
                out.flush()

        with self.errors():
            asyncio.run(tail())
            # The log stream closes as the job ends; the status may lag a moment.
            deadline = time.time() + 30
            while not (status := self.client.get_job_status(job_id)).is_terminal():
                if time.time() > deadline:
                    break
                time.sleep(0.5)
        return status


# --- what a job runs ------------------------------------------------------------------


def job_arguments(
    config: str, overrides: list[str], *, command: str = "train", local: bool = False,
    root: Path = ROOT,
) -> tuple[list[str], Any]:
    """``[command, CONFIG, overrides...]`` for ``python -m metadist.cli`` on the cluster and
    the config they make, checked here. CONFIG is relative to the working directory the
    job runs in; on the local cluster relative paths in the config become absolute."""
    from metadist.cli import resolve_config
    from metadist.config import absolute_paths, load_config

    if not Path(config).is_file() and (root / config).is_file():
        config = str(root / config)  # configs/x.yaml from outside the checkout
    path = resolve_config(config).resolve()
    loaded = load_config(path, overrides)  # ConfigError here, before anything is submitted
    try:
        relative = path.relative_to(root)
    except ValueError:
        raise ClusterError(
            f"config {path} is outside {root}, the directory shipped to the cluster: "
            "put it under configs/"
        ) from None
    # On the local cluster the filesystem is the same, but the job's working directory is
    # a copy without data/ and runs/.
    extra = [f"{k}={v}" for k, v in absolute_paths(loaded).items()] if local else []
    return [command, relative.as_posix(), *overrides, *extra], loaded


def runtime_env(
    *, env_vars: dict[str, str], pip: list[str] | None = None, root: Path = ROOT,
) -> dict[str, Any]:
    env = {"working_dir": str(root), "excludes": EXCLUDES,
           # One intra-op thread unless asked: a driver or actor spinning threads on a
           # shared node slows everything (train workers set their own from the config).
           # `jobs stop` sends SIGTERM and, by Ray's default, SIGKILL 3 s later: too soon
           # for a run to finish its step and checkpoint it. The job's supervisor reads the
           # grace period from the job's own environment.
           "env_vars": {"OMP_NUM_THREADS": "1", "RAY_JOB_STOP_WAIT_TIME_S": STOP_GRACE_S,
                        **env_vars}}
    if pip:
        env["pip"] = pip
    return env


def pinned_requirements() -> list[str]:
    """metadist's dependencies at the versions installed here (``name==version``)."""
    pins = []
    for req in metadata.requires("metadist") or []:
        if "extra ==" in req:
            continue
        name = req.split(";")[0].strip()
        base = name.split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("!")[0]
        extras = name[len(base):].split("]")[0] + "]" if "[" in name else ""
        pins.append(f"{base.strip()}{extras}=={metadata.version(base.strip())}")
    return pins


# --- the command line ----------------------------------------------------------------


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
    p.add_argument("config", help="YAML config under configs/ (shipped with the repository)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. workers=2")
    p.add_argument("--tune", action="store_true", help="run `metadist tune` instead of train")
    p.add_argument("--working-dir", type=Path, default=ROOT,
                   help=f"directory shipped to the cluster, the job's working directory "
                   f"(default: {ROOT})")
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
    address, local_cluster = resolve_address(getattr(args, "address", None))
    local = local_cluster is not None
    command = "tune" if args.tune else "train"
    root = args.working_dir.resolve()
    argv, config = job_arguments(args.config, args.overrides, command=command, local=local,
                                 root=root)  # checked before anything goes over the network
    env_vars = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--env {item!r} is not of the form KEY=VALUE")
        env_vars[key] = value
    uri = args.mlflow_uri
    if uri is None and local and config.tracking.enabled:
        from metadist.tracking import resolve_tracking_uri

        uri = resolve_tracking_uri(config)  # yours: $MLFLOW_TRACKING_URI or ./mlflow.db
    if uri:
        if local:
            from metadist.tracking import check_reachable

            check_reachable(uri)  # this machine sees what the local cluster sees
        env_vars["MLFLOW_TRACKING_URI"] = uri
    pip = None
    if args.requirements:
        pip = [line.strip() for line in Path(args.requirements).read_text().splitlines()
               if line.strip() and not line.lstrip().startswith("#")]
    elif args.pip:
        pip = pinned_requirements()
    entrypoint = shlex.join(["python", "-m", "metadist.cli", *argv])
    jobs = Jobs(address, getattr(args, "token_file", None))
    # Ray lists every .gitignore it honours and every directory it skips by default.
    logging.getLogger("ray._private.runtime_env.packaging").setLevel(logging.WARNING)
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)
    job_id = jobs.submit(entrypoint, runtime_env(env_vars=env_vars, pip=pip, root=root),
                         metadata={"metadist_command": command, "config": argv[1]})
    print(f"submitted {job_id} to {jobs.address}: {entrypoint}", flush=True)
    if args.no_follow:
        print(f"follow it with: metadist jobs logs {job_id} --follow")
        return 0
    return _follow_to_end(jobs, job_id)


def _follow_to_end(jobs: Jobs, job_id: str) -> int:
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


def _short(text: str | None, width: int = 90) -> str:
    text = text or ""
    return text if len(text) <= width else text[: width - 3] + "..."
