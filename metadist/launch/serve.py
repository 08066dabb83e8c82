"""``metadist serve MODEL_URI``: a trained learner behind HTTP, on Ray Serve, until Ctrl-C.

MODEL_URI is a checkpoint file or an MLflow model (``models:/NAME/VERSION``,
``models:/NAME@ALIAS``, ``runs:/RUN_ID/model``) that ``serving.mlflow_model.log_learner``
logged. Everything a user can get wrong (the file, the URI, a flag, a taken port, a
checkpoint that would import code unasked) is found here, before Ray starts, and is an
error naming it.

Without ``--address`` (or ``$RAY_ADDRESS``) the Ray is a local one started as every Ray
metadist starts is, on 127.0.0.1 only (``metadist.runners.loopback``), here without the
dashboard, which Serve does not need. With one, it is that cluster's, reached with its
token as ``metadist submit`` reaches it (``RAY_AUTH_MODE=token``; ``--token-file``, else
``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``). Serve's HTTP
proxy runs on the head node only and listens on ``--host``: 127.0.0.1 unless the user
names another.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from metadist.launch.cluster import ClusterError, token_source
from metadist.learner import Learner
from metadist.models import TRUST_CODE_ENV
from metadist.runners.loopback import LOOPBACK, LOOPBACK_ENV, keep_ray_on_loopback
from metadist.serving.task import Limits
from metadist.tracking import MODEL_URI_PREFIXES, download_model_checkpoint
from metadist.training.signals import sigterm_unwinds

DEFAULT_PORT = 8000


def serve_model(
    model_uri: str,
    *,
    host: str = LOOPBACK,
    port: int = DEFAULT_PORT,
    replicas: int = 1,
    max_batch_size: int = 16,
    batch_wait_ms: float = 5.0,
    cache_mb: float = 256.0,
    address: str | None = None,
    token_file: str | None = None,
    log: Callable[[str], None] = print,
) -> int:
    """Serve ``model_uri`` until Ctrl-C (exit status 130) or SIGTERM (143); Serve is shut
    down either way (on a cluster: this application, and Serve itself if it started it)."""
    check_options(host=host, port=port, replicas=replicas, max_batch_size=max_batch_size,
                  batch_wait_ms=batch_wait_ms, cache_mb=cache_mb, token_file=token_file)
    trust_code = os.environ.get(TRUST_CODE_ENV, "") == "1"
    checkpoint = read_checkpoint(model_uri)
    learner = load_learner(checkpoint, model_uri, trust_code)
    address = ray_address(address)
    if address is None or is_loopback(address.split("://")[-1].rpartition(":")[0]):
        check_port_free(host, port)  # the proxy will listen on this machine

    connect_ray(address, token_file, replicas)  # before Ray is imported: see there
    import ray
    from ray import serve

    owns_serve = True
    # From here Ctrl-C and SIGTERM, startup included, unwind through the shutdown below
    # (ray.init replaced the SIGTERM handler that cli.main installed).
    with sigterm_unwinds():
        try:
            from metadist.serving.ray_serve import APP_NAME, ServeOptions, application

            owns_serve = address is None or not serve_running()
            serve.start(http_options={"host": host, "port": port},
                        proxy_location="HeadOnly")
            options = ServeOptions(max_batch_size=max_batch_size,
                                   batch_wait_s=batch_wait_ms / 1000,
                                   cache_bytes=int(cache_mb * 2**20), limits=Limits())
            serve.run(application(checkpoint, model_uri, trust_code=trust_code,
                                  replicas=replicas, options=options),
                      name=APP_NAME, route_prefix="/")
            announce(log, model_uri, learner, host, port, replicas, max_batch_size,
                     batch_wait_ms, cache_mb)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            log("stopping")
            return 130
        finally:
            try:
                if owns_serve:
                    serve.shutdown()
                else:  # a cluster's Serve that was there before: only what this started
                    serve.delete(APP_NAME)
            finally:
                ray.shutdown()


def announce(log: Callable[[str], None], model_uri: str, learner: Learner, host: str,
             port: int, replicas: int, max_batch_size: int, batch_wait_ms: float,
             cache_mb: float) -> None:
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    ways = learner.ways or "any number of"
    log(f"serving {model_uri} ({learner.step.algorithm}, {ways} classes per task; "
        f"{replicas} replica(s), batches of up to {max_batch_size} within "
        f"{batch_wait_ms:g} ms, cache {cache_mb:g} MB per replica) at {url}")
    log(f"  POST {url}/predict  (a task: support, labels, query)   GET {url}/healthz   "
        f"GET {url}/stats")
    if not is_loopback(host):
        log(f"  listening on {host}, not loopback: whoever reaches it may send tasks (the "
            "server has no authentication of its own)")
    log("Ctrl-C stops it")
    sys.stdout.flush()


def ray_address(address: str | None) -> str | None:
    """``--address``, else a driver's ``$RAY_ADDRESS`` (an http:// one is a job server's,
    for ``metadist submit``); None: a local Ray."""
    env = os.environ.get("RAY_ADDRESS", "").strip()
    return address or (env if env and not env.startswith("http") else None)


def check_options(*, host: str, port: int, replicas: int, max_batch_size: int,
                  batch_wait_ms: float, cache_mb: float, token_file: str | None) -> None:
    if not 1 <= port <= 65535:
        raise ValueError(f"--port {port}: a TCP port is 1-65535")
    if replicas < 1:
        raise ValueError(f"--replicas {replicas}: at least 1")
    if max_batch_size < 1:
        raise ValueError(f"--max-batch-size {max_batch_size}: at least 1 (1: no batching)")
    if not 0 <= batch_wait_ms <= 10_000:
        raise ValueError(f"--batch-wait-ms {batch_wait_ms:g}: 0 to 10000")
    if cache_mb < 0:
        raise ValueError(f"--cache-mb {cache_mb:g}: 0 (no cache) or more")
    if not host.strip():
        raise ValueError("--host: empty")
    if token_file is not None and not Path(token_file).expanduser().is_file():
        raise FileNotFoundError(f"--token-file {token_file}: no such file")


def read_checkpoint(model_uri: str) -> bytes:
    """The checkpoint's bytes, from a file or an MLflow model (downloaded, then removed)."""
    if model_uri.startswith(MODEL_URI_PREFIXES):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        path = download_model_checkpoint(model_uri)
        try:
            return path.read_bytes()
        finally:
            shutil.rmtree(_download_root(path), ignore_errors=True)
    if "://" in model_uri or model_uri.startswith(("models:", "runs:")):
        raise ValueError(f"MODEL_URI {model_uri}: neither a checkpoint file nor an MLflow "
                         "model URI (models:/NAME/VERSION, models:/NAME@ALIAS, "
                         "runs:/RUN_ID/model)")
    path = Path(model_uri).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"MODEL_URI {model_uri}: no such checkpoint file (a "
                                "metadist checkpoint, e.g. runs/NAME/checkpoints/final.pt, "
                                "or an MLflow model URI: models:/NAME/VERSION)")
    return path.read_bytes()


def _download_root(path: Path) -> Path:
    """The temporary directory ``download_model_checkpoint`` made for ``path``."""
    for parent in path.parents:
        if parent.name.startswith("metadist-model-"):
            return parent
    return path.parent


def load_learner(checkpoint: bytes, model_uri: str, trust_code: bool) -> Learner:
    """The learner the replicas will load, loaded here first: a checkpoint that cannot be
    served is an error before Ray starts."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint.pt"
        path.write_bytes(checkpoint)
        try:
            return Learner.load(path, trust_code=trust_code)
        except ValueError as err:
            raise ValueError(f"MODEL_URI {model_uri}: " + str(err).replace(str(path), "")
                             .lstrip(": ")) from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise ValueError(f"--port {port} on --host {host}: cannot listen there "
                             f"({err.strerror}); something else may listen on it: "
                             "pick another --port") from None


def connect_ray(address: str | None, token_file: str | None, replicas: int) -> None:
    """Start the local Ray, or connect to the cluster at ``address``. Call before Ray is
    imported: Ray reads its loopback switch (``LOOPBACK_ENV``) once, at import."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address is None:
        os.environ.update(LOOPBACK_ENV)
        keep_ray_on_loopback()
        import ray

        ray.init(
            # "local": a new instance even when `ray start` left a cluster on this
            # machine, which ray.init() would otherwise join.
            address="local", num_cpus=max(os.cpu_count() or 1, replicas),
            _node_ip_address=LOOPBACK, include_dashboard=False, log_to_driver=False,
        )
        return
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if token_file:
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(Path(token_file).expanduser())
        os.environ.pop("RAY_AUTH_TOKEN", None)
    host, _, port = address.split("://")[-1].rpartition(":")
    if is_loopback(host):  # a local cluster (`metadist cluster up --local`): stay on it
        os.environ.update(LOOPBACK_ENV)
        keep_ray_on_loopback()
    if "://" not in address and port.isdigit():
        try:  # Ray itself would retry for a minute before it says so
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        except OSError as err:
            raise ClusterError(f"--address {address}: nothing answers there "
                               f"({err.strerror or err}); is the cluster up?") from None
    import ray

    try:
        ray.init(address=address, log_to_driver=False)
    except Exception as err:  # Ray raises ConnectionError, RuntimeError, its own types
        where = token_source() or "nowhere"
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ClusterError(
            f"--address {address}: cannot connect to the Ray cluster ({type(err).__name__}: "
            f"{first}); its token was taken from {where} (--token-file FILE, RAY_AUTH_TOKEN "
            "or RAY_AUTH_TOKEN_PATH; `ray get-auth-token` on the head prints it)") from None


def serve_running() -> bool:
    """Whether the cluster already runs Serve (someone else's applications among it)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True
