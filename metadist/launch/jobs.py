"""Runs on a Ray cluster through the Ray Jobs API: what ``metadist submit`` and
``metadist jobs`` do.

A submitted run is ``python -m metadist.cli train CONFIG key=value ...`` (or ``tune``)
executed on the cluster's head in a copy of the directory the user stands in (the runtime
environment's ``working_dir``), with this metadist shipped beside it (``py_modules``) when
that directory does not hold it, so a job runs the code it was submitted with; the
config is checked here first, so a bad config never reaches the cluster. Ray's token
authentication stays on: every request carries the token (``--token-file``,
``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement

from metadist.config import (
    absolute_paths,
    credentials_in,
    load_config,
    redact,
    resolve_config,
)
from metadist.launch.cluster import ClusterError, LocalCluster, load_state, token_source
from metadist.tracking import check_reachable, git_commit, git_uncommitted, resolve_tracking_uri

PACKAGE = Path(__file__).resolve().parents[1]  # the metadist package this runs from
# Never shipped: environments, data, outputs (Ray also skips what .gitignore and .rayignore
# list). Anchored with "/": a bare "data" would also drop the package metadist/data.
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
                f"the Ray job server at {redact(self.address)} refused the request ({refused}; "
                f"token taken from {self.token_from}). The token is the cluster's "
                "~/.ray/auth_token (`ray get-auth-token` on the head prints it): pass "
                "--token-file FILE, or set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH"
            ) from None
        except ConnectionError as err:
            raise ClusterError(
                f"cannot reach the Ray job server at {redact(self.address)} ({err}); is the "
                "cluster up (`metadist cluster status`, `metadist cluster up --local`)?"
            ) from None
        except ClusterError:
            raise
        except RuntimeError as err:  # Ray's "Request failed with status code 404: ..."
            raise ClusterError(f"{redact(self.address)}: {err}") from None

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
    root: Path | None = None,
) -> tuple[list[str], Any]:
    """``[command, CONFIG, overrides...]`` for ``python -m metadist.cli`` on the cluster and
    the config they make, checked here. CONFIG is relative to ``root``, the directory
    shipped as the job's working directory (default: the current one); on the local
    cluster relative paths in the config become absolute."""
    root = Path(root or Path.cwd()).resolve()
    path = resolve_config(config).resolve()
    try:  # first: where the file is decides whether the job can read it at all
        relative = path.relative_to(root)
    except ValueError:
        raise ClusterError(
            f"config {path} is outside {root}, the directory shipped to the cluster as the "
            "job's working directory (the current directory unless --working-dir says "
            "otherwise): run submit from a directory that holds the config, or pass "
            "--working-dir"
        ) from None
    loaded = load_config(path, overrides)  # ConfigError here, before anything is submitted
    # On the local cluster the filesystem is the same, but the job's working directory is
    # a copy without data/ and runs/.
    extra = [f"{k}={v}" for k, v in absolute_paths(loaded).items()] if local else []
    return [command, relative.as_posix(), *overrides, *extra], loaded


def runtime_env(
    *, env_vars: dict[str, str], pip: list[str] | None = None, root: Path | None = None,
) -> dict[str, Any]:
    root = Path(root or Path.cwd()).resolve()
    env = {"working_dir": str(root),
           # One intra-op thread unless asked: a driver or actor spinning threads on a
           # shared node slows everything (train workers set their own from the config).
           # `jobs stop` sends SIGTERM and, by Ray's default, SIGKILL 3 s later: too soon
           # for a run to finish its step and checkpoint it. The job's supervisor reads the
           # grace period from the job's own environment.
           "env_vars": {"OMP_NUM_THREADS": "1", "RAY_JOB_STOP_WAIT_TIME_S": STOP_GRACE_S,
                        **source_tags(), **env_vars}}
    if PACKAGE.parent == root:  # a checkout of metadist: the job imports it from there
        env["excludes"] = EXCLUDES
    else:
        env["py_modules"] = [str(PACKAGE)]
        env["excludes"] = excludes_beside(PACKAGE, root)
    if pip:
        env["pip"] = pip
    return env


def excludes_beside(package: Path, root: Path) -> list[str]:
    """``EXCLUDES`` for a working directory shipped with ``package`` beside it. Ray
    applies one list to both, each relative to its own top, so ``/data`` would also drop
    ``metadist/data``: such a pattern becomes one per entry of the project's own folder."""
    out = []
    for pattern in EXCLUDES:
        name = pattern.removeprefix("/")
        if not pattern.startswith("/") or not (package / name).exists():
            out.append(pattern)
        elif (root / name).is_dir():
            out += [f"/{name}/{_escaped(child.name)}" for child in sorted((root / name).iterdir())
                    if not (package / name / child.name).exists()]
    return out


def _escaped(name: str) -> str:
    # A file name as a literal gitignore pattern.
    return "".join("\\" + c if c in "\\*?[]!#" else c for c in name)


def source_tags() -> dict[str, str]:
    """The commit of the metadist that is shipped and the files that differ from it, for
    the job's run tags (the shipped copy has no git history of its own)."""
    commit = git_commit(PACKAGE)
    if commit == "unknown":
        return {}
    return {"METADIST_GIT_COMMIT": commit,
            "METADIST_GIT_UNCOMMITTED": ", ".join(git_uncommitted(PACKAGE)) or "none"}


def pinned_requirements() -> list[str]:
    """metadist's dependencies at the versions installed here (``name[extras]==version``),
    the dev extra left out."""
    pins = []
    for line in metadata.requires("metadist") or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an optional extra's dependency
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        pins.append(f"{req.name}{extras}=={metadata.version(req.name)}")
    return pins


def submit(config: str, overrides: list[str], *, tune: bool = False,
           address: str | None = None, token_file: str | None = None,
           working_dir: Path | None = None, mlflow_uri: str | None = None,
           env: list[str] = (), pip: bool = False, requirements: str | None = None,
           ) -> tuple[Jobs, str, str]:
    """Check ``config`` here, then submit it as a job; return the client, the job id and
    its entrypoint. ``env``: ``KEY=VALUE`` items for the job's environment."""
    if mlflow_uri and credentials_in(mlflow_uri):
        # A job's environment is kept by Ray and shown by its dashboard and job API.
        raise ValueError(f"--mlflow-uri {redact(mlflow_uri)}...: the URI carries "
                         "credentials; set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD "
                         "where the job runs (the cluster's environment) instead")
    address, local_cluster = resolve_address(address)
    local = local_cluster is not None
    command = "tune" if tune else "train"
    root = Path(working_dir or Path.cwd()).resolve()
    if not root.is_dir():
        raise ClusterError(f"--working-dir {root}: no such directory")
    argv, loaded = job_arguments(config, overrides, command=command, local=local,
                                 root=root)  # checked before anything goes over the network
    env_vars = {}
    for item in env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--env {item!r} is not of the form KEY=VALUE")
        env_vars[key] = value
    uri = mlflow_uri
    if uri is None and local and loaded.tracking.enabled:
        uri = resolve_tracking_uri(loaded)  # yours: $MLFLOW_TRACKING_URI or ./mlflow.db
    if uri:
        if local:
            check_reachable(uri)  # this machine sees what the local cluster sees
        env_vars["MLFLOW_TRACKING_URI"] = uri
    packages = None
    if requirements:
        packages = [line.strip() for line in Path(requirements).read_text().splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
    elif pip:
        packages = pinned_requirements()
    entrypoint = shlex.join(["python", "-m", "metadist.cli", *argv])
    jobs = Jobs(address, token_file)
    # Ray lists every .gitignore it honours and every directory it skips by default.
    logging.getLogger("ray._private.runtime_env.packaging").setLevel(logging.WARNING)
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)
    job_id = jobs.submit(entrypoint, runtime_env(env_vars=env_vars, pip=packages, root=root),
                         metadata={"metadist_command": command, "config": argv[1]})
    return jobs, job_id, entrypoint
