"""A real multi-node Ray cluster on this machine, for trying things and for tests.

``metadist cluster up --local --nodes N`` starts a head node and N worker nodes with
``ray start``, each its own raylet with its own resources, all bound to 127.0.0.1, and
records what it started in a state file (``~/.metadist/local-cluster.json``, or
``$METADIST_CLUSTER_STATE``). ``metadist cluster down`` stops exactly those processes,
not every Ray on the machine as ``ray stop`` would.

Every node listens on loopback only (``metadist.runners.loopback``): each node's
``ray start`` runs as ``python -m metadist.launch.cluster start ...``, which keeps the
address 127.0.0.1, and every process of the cluster runs with Ray's loopback switch in its
environment, so a job's driver that connects to ``127.0.0.1:PORT`` stays there too.

Each node's ``ray start`` runs in a session of its own (``setsid``): the node's processes,
Ray's worker processes among them, share that session id, which is how ``down`` finds them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from metadist.runners.loopback import LOOPBACK, LOOPBACK_ENV, keep_ray_on_loopback

DEFAULT_TOKEN = Path.home() / ".ray" / "auth_token"
STATE_ENV = "METADIST_CLUSTER_STATE"
OWNER_ENV = "METADIST_CLUSTER_DIR"  # in the environment of every process a cluster starts
TEMP_PREFIX = "mdray-"
START_TIMEOUT_S = 120.0


class ClusterError(RuntimeError):
    """A cluster that cannot be started, reached or used; the message says what to do."""


@dataclass
class Node:
    name: str  # "head", "worker-1", ...
    session: int  # the session id (setsid) shared by this node's processes
    raylet_pid: int
    resources: dict[str, float]


@dataclass
class LocalCluster:
    address: str  # the GCS address, 127.0.0.1:PORT
    dashboard_url: str  # Ray dashboard and job server
    temp_dir: str
    gcs_pid: int
    nodes: list[Node] = field(default_factory=list)
    started: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> LocalCluster:
        data = json.loads(text)
        data["nodes"] = [Node(**n) for n in data["nodes"]]
        return cls(**data)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def node_of_pid(self, pid: int) -> Node | None:
        """The node a process runs on (a Ray worker shares its raylet's session)."""
        info = read_proc(pid)
        sessions = {n.session: n for n in self.nodes}
        while info is not None:
            if info.session in sessions:
                return sessions[info.session]
            info = read_proc(info.ppid) if info.ppid > 1 else None
        return None


def state_path(path: str | os.PathLike | None = None) -> Path:
    if path:
        return Path(path).expanduser()
    return Path(os.environ.get(STATE_ENV) or Path.home() / ".metadist" / "local-cluster.json")


def load_state(path: str | os.PathLike | None = None) -> LocalCluster | None:
    p = state_path(path)
    if not p.is_file():
        return None
    try:
        return LocalCluster.from_json(p.read_text())
    except (ValueError, TypeError, KeyError) as err:
        raise ClusterError(f"{p}: not a metadist cluster state file ({err})") from None


def is_alive(cluster: LocalCluster) -> bool:
    info = read_proc(cluster.gcs_pid)
    return (info is not None and info.session == cluster.nodes[0].session
            and started_by(cluster.gcs_pid, cluster))


def up(
    *,
    nodes: int = 2,
    cpus: float = 2,
    head_cpus: float = 0,
    object_store_mb: int = 512,
    port: int | None = None,
    dashboard_port: int | None = None,
    state: str | os.PathLike | None = None,
    log=print,
) -> LocalCluster:
    """Start a head and ``nodes`` worker nodes on 127.0.0.1; return what was started.

    The head has ``head_cpus`` CPUs (0 by default, like a real cluster's head: it runs the
    job drivers, Ray Train's controller and the job server, not the workers). Worker node
    ``i`` has ``cpus`` CPUs and a custom resource ``worker-i: 1`` to pin work to it.
    """
    if nodes < 1:
        raise ValueError(f"--nodes={nodes} must be >= 1 (worker nodes besides the head)")
    path = state_path(state)
    existing = load_state(path)
    if existing is not None:
        if is_alive(existing):
            raise ClusterError(
                f"a local cluster from {path} is running ({existing.dashboard_url}); "
                "stop it with `metadist cluster down` first"
            )
        stop(existing)  # what is left of a cluster whose head died
    token = ensure_token()
    port = _port(port, 6379, "--port")
    dashboard_port = _port(dashboard_port, 8265, "--dashboard-port")
    # One temp dir per node: each node's log monitor then forwards its own workers' logs
    # only (with one shared dir, every line reaches the driver once per node). Short
    # names: Ray's Unix sockets live in them.
    temp_dir = tempfile.mkdtemp(prefix=TEMP_PREFIX)
    env = node_env()
    # Every process of the cluster inherits it: how `down` tells them from anything else
    # that came to hold one of the recorded session ids (a reboot, PID reuse).
    env[OWNER_ENV] = temp_dir
    # Ports Ray would otherwise take at fixed numbers, colliding between nodes or with
    # another Ray on this machine.
    env["AUTOSCALER_METRIC_PORT"] = str(free_port())
    env["DASHBOARD_METRIC_PORT"] = str(free_port())
    store = str(object_store_mb * 1024 * 1024)
    head_args = [
        "--head", f"--port={port}", f"--dashboard-port={dashboard_port}",
        f"--dashboard-host={LOOPBACK}", "--include-dashboard=true",
        f"--ray-client-server-port={free_port()}",
        f"--num-cpus={head_cpus:g}", "--num-gpus=0",
    ]
    address = f"{LOOPBACK}:{port}"
    cluster = LocalCluster(
        address=address, dashboard_url=f"http://{LOOPBACK}:{dashboard_port}",
        temp_dir=temp_dir, gcs_pid=0, started=time.time(),
    )
    launched: list[Launch] = []
    try:
        log(f"starting the head node (Ray at {address}) ...")
        launched.append(launch_node("head", head_args, {"CPU": head_cpus}, env, temp_dir, store))
        cluster.nodes.append(wait_for_node(launched[0]))
        cluster.gcs_pid = find_in_session(cluster.nodes[0].session, "gcs_server")
        save_state(cluster, path)  # from here on, `down` can clean up whatever started
        log(f"starting {nodes} worker nodes ({cpus:g} CPU each) ...")
        for i in range(1, nodes + 1):  # at once: each `ray start` mostly waits
            launched.append(launch_node(
                f"worker-{i}",
                [f"--address={address}", f"--num-cpus={cpus:g}", "--num-gpus=0",
                 f"--resources={json.dumps({f'worker-{i}': 1})}"],
                {"CPU": float(cpus), f"worker-{i}": 1.0}, env, temp_dir, store,
            ))
        for launch in launched[1:]:
            cluster.nodes.append(wait_for_node(launch))
            save_state(cluster, path)
    except BaseException:
        kill_sessions([launch.proc.pid for launch in launched])
        path.unlink(missing_ok=True)
        raise
    log(describe(cluster, path, token))
    return cluster


@dataclass
class Launch:
    name: str
    proc: subprocess.Popen
    log_path: Path
    resources: dict[str, float]


def launch_node(
    name: str, args: list[str], resources: dict[str, float], env: dict[str, str],
    temp_dir: str, store: str,
) -> Launch:
    """``ray start`` for one node, in a session of its own."""
    node_dir = Path(temp_dir) / ("n0" if name == "head" else f"n{name.split('-')[-1]}")
    node_dir.mkdir()
    log_path = Path(temp_dir) / f"{name}.log"
    cmd = [
        sys.executable, "-m", "metadist.launch.cluster", "start", f"--node-ip-address={LOOPBACK}",
        f"--temp-dir={node_dir}",
        f"--object-store-memory={store}", "--disable-usage-stats",
        # Fixed by default (52365): a second node on this host could not bind it.
        f"--dashboard-agent-listen-port={free_port()}", *args,
    ]
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return Launch(name, proc, log_path, resources)


def wait_for_node(launch: Launch, timeout: float = START_TIMEOUT_S) -> Node:
    try:
        rc = launch.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = None
    if rc != 0:
        tail = "\n".join(launch.log_path.read_text(errors="replace").splitlines()[-15:])
        raise ClusterError(
            f"`ray start` for the {launch.name} node "
            + (f"did not finish in {timeout:.0f} s" if rc is None else f"failed ({rc})")
            + f"; its log {launch.log_path} ends:\n{tail}"
        )
    session = launch.proc.pid
    return Node(name=launch.name, session=session,
                raylet_pid=find_in_session(session, "raylet"), resources=launch.resources)


def down(state: str | os.PathLike | None = None, *, keep_temp: bool = False,
         log=print) -> list[int]:
    """Stop the processes of the cluster in the state file; return the PIDs signalled."""
    path = state_path(state)
    cluster = load_state(path)
    if cluster is None:
        raise ClusterError(f"no local cluster recorded in {path} (nothing to stop)")
    strangers = [p for p in session_processes([n.session for n in cluster.nodes])
                 if not started_by(p, cluster)]
    pids = stop(cluster, remove_temp=not keep_temp)
    path.unlink(missing_ok=True)
    removed = not keep_temp and created_by_up(cluster.temp_dir)
    log(f"stopped the local cluster {cluster.dashboard_url}: {len(pids)} processes"
        + (f", removed {cluster.temp_dir}" if removed else "")
        + (f"; left alone {len(strangers)} processes in its recorded sessions that it did "
           f"not start (PIDs {strangers[:10]}: the state file {path} was stale)"
           if strangers else ""))
    return pids


def stop(cluster: LocalCluster, *, remove_temp: bool = True) -> list[int]:
    """Stop the processes this cluster started, and only those; remove its temp dir if
    ``up`` made it."""
    pids = kill_sessions([n.session for n in cluster.nodes],
                         only=lambda pid: started_by(pid, cluster))
    if remove_temp and created_by_up(cluster.temp_dir):
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
    return pids


def started_by(pid: int, cluster: LocalCluster) -> bool:
    """The process, or one of its ancestors, carries the cluster's mark in its environment
    (see ``up``); an ancestor counts because Ray starts some processes (the dashboard's
    modules, through a multiprocessing forkserver) with an environment of their own."""
    mark = f"{OWNER_ENV}={cluster.temp_dir}".encode()
    info = read_proc(pid)
    while info is not None:
        try:
            if mark in Path(f"/proc/{info.pid}/environ").read_bytes().split(b"\0"):
                return True
        except OSError:
            pass
        info = read_proc(info.ppid) if info.ppid > 1 else None
    return False


def created_by_up(temp_dir: str) -> bool:
    """A directory ``up`` made: named by it, in the temp folder, with the head's folder."""
    path = Path(temp_dir)
    return (path.name.startswith(TEMP_PREFIX) and path.parent == Path(tempfile.gettempdir())
            and (path / "n0").is_dir() and not path.is_symlink())


def status(state: str | os.PathLike | None = None) -> str:
    path = state_path(state)
    cluster = load_state(path)
    if cluster is None:
        return f"no local cluster recorded in {path}"
    lines = [f"{cluster.dashboard_url} (Ray at {cluster.address}), state {path}:"]
    for n in cluster.nodes:
        alive = read_proc(n.raylet_pid) is not None and started_by(n.raylet_pid, cluster)
        res = ", ".join(f"{k} {v:g}" for k, v in n.resources.items())
        lines.append(f"  {n.name:<9} raylet pid {n.raylet_pid:<7} "
                     f"{'alive' if alive else 'DEAD '}  {res}")
    return "\n".join(lines)


def describe(cluster: LocalCluster, path: Path, token: Path | None) -> str:
    workers = [n for n in cluster.nodes if n.name != "head"]
    where = f"the token in {token}" if token else "the token in $RAY_AUTH_TOKEN"
    return "\n".join([
        f"local Ray cluster up: a head and {len(workers)} worker nodes on {LOOPBACK}",
        f"  Ray address (GCS):       {cluster.address}",
        f"  dashboard and job API:   {cluster.dashboard_url}  ({where})",
        f"  logs:                    {cluster.temp_dir}/n*/session_latest/logs",
        f"  recorded in:             {path}",
        "submit a run:  metadist submit configs/sinusoid_maml.yaml workers=2 train.steps=200",
        "or drive it from this shell (Ray must keep 127.0.0.1, see metadist/launch/cluster.py):",
        f"  export RAY_ADDRESS={cluster.address} RAY_AUTH_MODE=token "
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0",
        "stop it:       metadist cluster down",
    ])


def save_state(cluster: LocalCluster, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(cluster.to_json())
    tmp.replace(path)


def node_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "RAY_AUTH_MODE": "token",  # on for the workers too, not only when a token exists
        **LOOPBACK_ENV,  # keep 127.0.0.1 (see metadist.runners.loopback)
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # cloud spot instances only
        # `python` and `metadist` in a job's entrypoint are this environment's.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    })
    env.pop("RAY_ADDRESS", None)
    return env


def token_source() -> str | None:
    """Where Ray takes its token from, as its client does: ``RAY_AUTH_TOKEN`` (the
    variable), else the file ``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``; or None."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or DEFAULT_TOKEN).expanduser()
    return str(path) if path.is_file() else None


def ensure_token() -> Path | None:
    """The token file the cluster will use (None: ``$RAY_AUTH_TOKEN``), generated by Ray
    (``ray get-auth-token --generate``) into ``~/.ray/auth_token`` when there is none."""
    source = token_source()
    if source is None and os.environ.get("RAY_AUTH_TOKEN_PATH"):
        raise ClusterError(f"RAY_AUTH_TOKEN_PATH={os.environ['RAY_AUTH_TOKEN_PATH']}: no such "
                           "file (unset it to use, or generate, ~/.ray/auth_token)")
    if source is None:
        subprocess.run([sys.executable, "-m", "metadist.launch.cluster", "get-auth-token",
                        "--generate"], check=True, capture_output=True)
        source = token_source()
    return None if source in (None, "RAY_AUTH_TOKEN") else Path(source)


_given: set[int] = set()  # ports handed out by this process: never the same one twice


def free_port(preferred: int | None = None) -> int:
    """``preferred`` when nothing listens on it, else a port the OS picks."""
    for candidate in ([preferred] if preferred else []) + [0] * 20:
        with socket.socket() as s:
            # Like the servers that will bind it: a port in TIME_WAIT is free.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((LOOPBACK, candidate))
            except OSError:
                continue
            port = s.getsockname()[1]
        if port == preferred or port not in _given:
            _given.add(port)
            return port
    raise ClusterError("no free TCP port on 127.0.0.1")


def _port(asked: int | None, default: int, flag: str) -> int:
    """The port asked for, refused when taken; else the default if free, else any."""
    if not asked:
        return free_port(default)
    if free_port(asked) != asked:
        raise ClusterError(f"{flag}={asked}: something on this machine listens there already")
    return asked


# --- processes, from /proc (Linux) ---------------------------------------------------


@dataclass
class ProcInfo:
    pid: int
    ppid: int
    session: int
    name: str


def read_proc(pid: int) -> ProcInfo | None:
    """A live process (zombies count as gone), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return ProcInfo(pid=pid, ppid=int(fields[1]), session=int(fields[3]), name=name)


def all_procs() -> list[ProcInfo]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := read_proc(int(entry.name))) is not None:
            out.append(info)
    return out


def find_in_session(session: int, name: str) -> int:
    for p in all_procs():
        if p.session == session and p.name == name:
            return p.pid
    raise ClusterError(f"no {name} process in session {session}: Ray did not start it")


def session_processes(sessions: list[int]) -> list[int]:
    """The processes of these sessions and their descendants (a job's driver runs in a
    session of its own, as a child of the job's supervisor)."""
    procs = all_procs()
    children: dict[int, list[int]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p.pid)
    found = {p.pid for p in procs if p.session in sessions}
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    found.discard(os.getpid())
    return sorted(found)


def kill_sessions(sessions: list[int], grace_s: float = 3.0,
                  only: Callable[[int], bool] = lambda pid: True) -> list[int]:
    """SIGTERM the sessions' processes for which ``only(pid)`` holds, SIGKILL what is left
    after ``grace_s``."""
    pids = [p for p in session_processes(sessions) if only(p)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while time.time() < deadline and any(read_proc(p) for p in pids):
            time.sleep(0.1)
        # Stragglers started meanwhile (a worker being spawned) go in the second round.
        pids = sorted(set(pids) | {p for p in session_processes(sessions) if only(p)})
    return pids


# --- `ray start` kept on loopback ------------------------------------------------------


def _ray_cli() -> None:
    """``ray`` itself, except that ``ray start`` keeps ``--node-ip-address=127.0.0.1``
    (Ray replaces a loopback address with the outward one; see the module doc)."""
    import ray._private.ray_constants as ray_constants
    from ray.scripts.scripts import main

    keep_ray_on_loopback()
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 would make `ray start` itself refuse worker nodes;
    # the processes it starts still see it.
    ray_constants.ENABLE_RAY_CLUSTER = True
    sys.argv = ["ray", *sys.argv[1:]]
    main()


if __name__ == "__main__":
    _ray_cli()
