"""`metadist cluster down` stops only what `cluster up` started: a state file that names
other processes (stale after a reboot or PID reuse, or edited) kills nothing and deletes no
directory it did not create. No Ray needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from metadist.cli import main
from metadist.launch.cluster import OWNER_ENV, read_proc


def state_naming(path: Path, session: int, temp_dir: Path) -> None:
    path.write_text(json.dumps({
        "address": "127.0.0.1:1", "dashboard_url": "http://127.0.0.1:1",
        "temp_dir": str(temp_dir), "gcs_pid": session, "started": 0.0,
        "nodes": [{"name": "head", "session": session, "raylet_pid": session,
                   "resources": {"CPU": 0}}],
    }))


def sleeper(env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                            start_new_session=True, env=env)


def test_a_stale_state_file_kills_nothing_and_deletes_nothing(tmp_path, capsys):
    stranger = sleeper()  # a process that now holds the recorded session id
    precious = tmp_path / "precious"
    (precious / "n0").mkdir(parents=True)
    state = tmp_path / "state.json"
    state_naming(state, stranger.pid, precious)
    try:
        assert main(["cluster", "down", "--state", str(state)]) == 0
        out = capsys.readouterr().out
        assert "0 processes" in out and "left alone 1 processes" in out, out
        time.sleep(0.2)
        assert read_proc(stranger.pid) is not None and stranger.poll() is None
        assert precious.is_dir() and not state.exists()
        # A temp dir that `up` would have made, named in the state file, yet no process of
        # its cluster: still only the directory goes, never the stranger.
        made = Path(tempfile.mkdtemp(prefix="mdray-"))
        (made / "n0").mkdir()
        state_naming(state, stranger.pid, made)
        assert main(["cluster", "down", "--state", str(state)]) == 0
        assert not made.exists() and stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_down_stops_the_processes_that_carry_the_cluster_s_mark(tmp_path, capsys):
    made = Path(tempfile.mkdtemp(prefix="mdray-"))
    (made / "n0").mkdir()
    ours = sleeper({**os.environ, OWNER_ENV: str(made)})
    state = tmp_path / "state.json"
    state_naming(state, ours.pid, made)
    try:
        assert main(["cluster", "down", "--state", str(state)]) == 0
        assert ours.wait(timeout=10) is not None
        assert "1 processes" in capsys.readouterr().out and not made.exists()
    finally:
        if ours.poll() is None:
            ours.kill()
