"""`python -m cluster.tracking_server`: an MLflow tracking server on loopback.

A real backend (SQLite file by default; any SQLAlchemy URL MLflow supports, such as
postgresql://USER@HOST:5432/DB, with --backend-store-uri) and a real artifact root (a
folder, or s3://bucket/prefix, with --artifacts-destination), served on 127.0.0.1 so
that several processes (the driver, `ray job submit` jobs on this machine, the UI)
share one store. Artifacts are proxied by the server: clients need no bucket
credentials. The schema is upgraded on start (`mlflow db upgrade`), so a store
written by an older MLflow keeps working after an upgrade.

A database password never appears in a URI here (it would show in process listings
and logs): it comes from PGPASSWORD in the environment or from --password-file, and
reaches only the server's environment (libpq reads it). On a cluster the head runs
the server (see ray_cluster.yaml) and users reach it through an SSH tunnel: it is
never bound to a public interface here. `make mlflow-server` runs it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pipeline.tracking import default_store, home


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


def redact(uri: str) -> str:
    """The URI with any password masked, for messages."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", uri)


def check_backend(uri: str) -> None:
    if re.search(r"://[^:/@]+:[^@]*@", uri):
        raise ValueError(f"{redact(uri)}: put the database password in PGPASSWORD or --password-file, not in the "
                         "URI (a URI shows in process listings and logs)")


def upgrade(backend: str, env: dict | None = None) -> None:
    """`mlflow db upgrade`: bring an existing store's schema to this MLflow's (a new,
    empty database is created by the server itself)."""
    if backend.startswith("sqlite:///") and not Path(backend[len("sqlite:///"):]).exists():
        return
    out = subprocess.run([str(Path(sys.executable).parent / "mlflow"), "db", "upgrade", backend], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        tail = "\n".join(out.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"mlflow db upgrade {redact(backend)} failed:\n{tail}")


def start(backend: str, artifacts: str, port: int, log: Path | None = None,
          host: str = "127.0.0.1", password: str | None = None) -> tuple[subprocess.Popen, str]:
    """Upgrade the schema, start the server in its own process group and wait until it
    answers. Its output goes to `log` (a file: a pipe nobody reads would eventually
    block the server), or to this process's stdout/stderr. `password`, if given, goes
    to the server's environment as PGPASSWORD, nowhere else."""
    check_backend(backend)
    if artifacts and "://" not in artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **({"PGPASSWORD": password} if password else {}))
    upgrade(backend, env)
    out = open(log, "ab") if log else None  # noqa: SIM115 - the child keeps it open
    proc = subprocess.Popen(command(backend, artifacts, port, host), start_new_session=True, stdout=out,
                            stderr=subprocess.STDOUT if out else None, env=env)
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
    p.add_argument("--backend-store-uri", "--backend", dest="backend",
                   default=os.environ.get("MLFLOW_BACKEND_STORE_URI") or default_store(),
                   help="backend store URI: postgresql://USER@HOST:PORT/DB (password: PGPASSWORD or --password-file), "
                        "sqlite:///FILE, or any SQLAlchemy URL MLflow supports (default: MLFLOW_BACKEND_STORE_URI, "
                        "else the store every pipeline command uses by default, $VGG_HOME/mlflow.db, ~/.vgg by default)")
    p.add_argument("--password-file", help="file whose first line is the database password (e.g. a mounted "
                                           "Kubernetes secret); default: PGPASSWORD from the environment")
    p.add_argument("--artifacts-destination", "--artifacts", dest="artifacts",
                   default=os.environ.get("MLFLOW_ARTIFACTS_DESTINATION") or str(home() / "mlartifacts"),
                   help="artifact root, proxied by the server: s3://bucket/prefix or a folder (default: "
                        "MLFLOW_ARTIFACTS_DESTINATION, else $VGG_HOME/mlartifacts, beside the default store)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default loopback; 0.0.0.0 only inside a private pod network, "
                        "as in cluster/k8s/raycluster.yaml)")
    a = p.parse_args(argv)
    if a.backend.startswith("sqlite:///"):
        Path(a.backend[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    password = None
    if a.password_file:
        try:
            password = Path(a.password_file).read_text().splitlines()[0]
        except (OSError, IndexError):
            print(f"tracking_server: cannot read a password from {a.password_file}", file=sys.stderr)
            return 2
    try:
        proc, url = start(a.backend, a.artifacts, a.port, host=a.host, password=password)
    except (ValueError, RuntimeError) as exc:
        print(f"tracking_server: {exc}", file=sys.stderr)
        return 2
    print(f"MLflow tracking server on {url} (backend {redact(a.backend)}, artifacts {a.artifacts})\n"
          f"  export MLFLOW_TRACKING_URI={url}\n  Ctrl-C stops it.", flush=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        stop(proc)
        return 0


if __name__ == "__main__":
    sys.exit(main())
