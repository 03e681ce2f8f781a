"""`python -m cluster.tracking_server` as ray_cluster.yaml's head start line runs it
(`--detach LOG --pid-file FILE`): the command returns only once the server answers, or
fails with the log's tail; running it again replaces the running server (no pkill); and
SIGTERM ends the whole process tree (`mlflow server`, uvicorn, the job runner and its
huey consumers), so the port is free again. Real MLflow servers on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from services import free_port

from cluster.tracking_server import _alive, group_members, stop_group

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # two MLflow server starts: 10-20 s each when idle, over a minute on a loaded machine


def _start(tmp_path: Path, port: int, pid_file: Path, artifacts: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.tracking_server", "--detach", str(tmp_path / "server.log"),
                           "--pid-file", str(pid_file), "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                           "--artifacts-destination", artifacts or str(tmp_path / "art"), "--port", str(port)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


def _ids(pid_file: Path) -> tuple[int, int]:
    wrapper, pgid = (int(x) for x in pid_file.read_text().split())
    return wrapper, pgid


def _port_free(port: int) -> bool:
    """Whether a new server can listen on `port` (with SO_REUSEADDR, as uvicorn binds: the
    old server's closed connections may sit in TIME_WAIT, a live listener may not)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _gone(pids: set[int], timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_detached_start_restart_by_pid_file_and_sigterm_free_the_port(tmp_path):
    port, pid_file = free_port(), tmp_path / "run" / "server.pid"
    # a server that cannot start: the command fails and says why (the log's tail)
    bad = _start(tmp_path, port, pid_file, artifacts="/proc/no-such-place/art")
    assert bad.returncode == 2 and "did not start" in bad.stderr and "/proc/no-such-place" in bad.stderr, bad
    try:
        first = _start(tmp_path, port, pid_file)
        assert first.returncode == 0, first.stdout + first.stderr
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).close()  # answering on return
        wrapper, pgid = _ids(pid_file)
        old = group_members(pgid) | {wrapper}
        assert len(old) >= 4, old  # wrapper, mlflow server, uvicorn, the job runner (and its consumers)

        # the head's start line run again (ray up twice): the old tree goes, the new server takes the port
        second = _start(tmp_path, port, pid_file)
        assert second.returncode == 0, second.stdout + second.stderr
        assert not any(_alive(p) for p in old), [p for p in old if _alive(p)]
        wrapper, pgid = _ids(pid_file)
        assert wrapper not in old and group_members(pgid)
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).close()

        # SIGTERM to the wrapper, as `kill` or systemd sends it: nothing of the server is left, the port is free
        members = group_members(pgid) | {wrapper}
        os.kill(wrapper, signal.SIGTERM)
        assert _gone(members), [p for p in members if _alive(p)]
        assert _port_free(port)
    finally:
        if pid_file.exists():
            stop_group(_ids(pid_file)[1])
