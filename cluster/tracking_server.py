"""`python -m cluster.tracking_server`: an MLflow tracking server on loopback.

A real backend (SQLite file by default; any SQLAlchemy URL such as
postgresql://... with --backend) and a real artifact root (a folder, or
s3://bucket/prefix), served on 127.0.0.1 so that several processes (the driver,
`ray job submit` jobs on this machine, the UI) share one store. On a cluster the
head runs it (see ray_cluster.yaml) and users reach it through an SSH tunnel:
it is never bound to a public interface here. `make mlflow-server` runs it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def command(backend: str, artifacts: str, port: int, host: str = "127.0.0.1", workers: int = 1) -> list[str]:
    return [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", backend,
            "--artifacts-destination", artifacts, "--host", host, "--port", str(port), "--workers", str(workers)]


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 120, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            err = log.read_text()[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"mlflow server exited with {proc.returncode}: {err}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"mlflow server at {url} did not answer /health in {timeout:.0f} s")


def start(backend: str, artifacts: str, port: int, log: Path | None = None,
          host: str = "127.0.0.1") -> tuple[subprocess.Popen, str]:
    """Start the server in its own process group and wait until it answers. Its output
    goes to `log` (a file: a pipe nobody reads would eventually block the server), or
    to this process's stdout/stderr."""
    if artifacts and "://" not in artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
    out = open(log, "ab") if log else None  # noqa: SIM115 - the child keeps it open
    proc = subprocess.Popen(command(backend, artifacts, port, host), start_new_session=True, stdout=out,
                            stderr=subprocess.STDOUT if out else None)
    if out:
        out.close()
    url = f"http://127.0.0.1:{port}"  # reachable on loopback whatever the bind address
    try:
        wait_healthy(url, proc, log=log)
    except BaseException:
        stop(proc)
        raise
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's worker processes too
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.tracking_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default=f"sqlite:///{REPO / 'mlflow-server' / 'mlflow.db'}",
                   help="backend store URI: sqlite:///FILE or postgresql://USER@HOST/DB (default: %(default)s)")
    p.add_argument("--artifacts", default=str(REPO / "mlflow-server" / "artifacts"),
                   help="artifact root served by the server: a folder or s3://bucket/prefix (default: %(default)s)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default loopback; 0.0.0.0 only inside a private pod network, "
                        "as in cluster/k8s/raycluster.yaml)")
    a = p.parse_args(argv)
    if a.backend.startswith("sqlite:///"):
        Path(a.backend[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    proc, url = start(a.backend, a.artifacts, a.port, host=a.host)
    print(f"MLflow tracking server on {url} (backend {a.backend}, artifacts {a.artifacts})\n"
          f"  export MLFLOW_TRACKING_URI={url}\n  Ctrl-C stops it.", flush=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        stop(proc)
        return 0


if __name__ == "__main__":
    sys.exit(main())
