"""`python -m cluster.tracking_server`: an MLflow tracking server on loopback.

A real backend (SQLite file by default; any SQLAlchemy URL MLflow supports, such as
postgresql://USER@HOST:5432/DB, with --backend-store-uri) and a real artifact root (a
folder, or s3://bucket/prefix, with --artifacts-destination), served on 127.0.0.1 so
that several processes (the driver, `ray job submit` jobs on this machine, the UI)
share one store. Artifacts are proxied by the server: clients need no bucket
credentials. The schema is upgraded on start (`mlflow db upgrade`) when it is older than
the installed MLflow's, so a store written by an older MLflow keeps working after an upgrade.

A database password never appears in a URI here (it would show in process listings
and logs): it comes from PGPASSWORD in the environment or from --password-file, and
reaches only the server's environment (libpq reads it). On a cluster the head runs
the server (see ray_cluster.yaml) and users reach it through an SSH tunnel: it is
never bound to a public interface here. `make mlflow-server` runs it. MLflow's job
runner (GenAI jobs, which training never submits) stays off unless
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true is in the environment.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import signal
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


def schema_head() -> str | None:
    """The installed MLflow's newest schema revision, read from its migration scripts
    (their `revision` and `down_revision` lines; importing MLflow to ask alembic would cost
    about what the check saves). None unless they name exactly one head."""
    spec = importlib.util.find_spec("mlflow")
    versions = Path(spec.submodule_search_locations[0]) / "store" / "db_migrations" / "versions"
    revisions, parents = set(), set()
    for script in versions.glob("[!_]*.py"):
        text = script.read_text()
        rev = re.search(r"""^revision(?:\s*:[^=]+)?\s*=\s*["'](\w+)["']""", text, re.M)
        down = re.search(r"^down_revision(?:\s*:[^=]+)?\s*=(.*)$", text, re.M)
        if not rev or not down:
            return None
        revisions.add(rev.group(1))
        parents.update(re.findall(r"""["'](\w+)["']""", down.group(1)))
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def store_revision(backend: str, password: str | None = None) -> str | None:
    """The schema revision a store records (alembic's version table, as MLflow keeps it);
    None where it records none or cannot be read."""
    query = "SELECT version_num FROM alembic_version"
    try:
        if backend.startswith("sqlite:///"):
            import sqlite3

            with contextlib.closing(sqlite3.connect(f"file:{backend[len('sqlite:///'):]}?mode=ro", uri=True)) as db:
                rows = db.execute(query).fetchall()
        else:
            import sqlalchemy

            engine = sqlalchemy.create_engine(backend, connect_args={"password": password} if password else {})
            try:
                with engine.connect() as conn:
                    rows = conn.execute(sqlalchemy.text(query)).fetchall()
            finally:
                engine.dispose()
    except Exception:  # noqa: BLE001 - no table, no driver, no server: the upgrade finds out and says why
        return None
    return rows[0][0] if len(rows) == 1 else None


def upgrade(backend: str, env: dict | None = None) -> None:
    """`mlflow db upgrade`: bring an existing store's schema to this MLflow's (a new,
    empty database is created by the server itself). A store already at this MLflow's
    newest revision is left as it is, without the upgrade command's 5 CPU-s of imports (a
    restart's usual case: the server's own start checks the schema again)."""
    if backend.startswith("sqlite:///") and not Path(backend[len("sqlite:///"):]).exists():
        return
    head = schema_head()
    if head is not None and store_revision(backend, (env or {}).get("PGPASSWORD")) == head:
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
    # MLflow's job runner (its GenAI jobs: judge optimisation, trace roll-ups) is off unless
    # asked for: training never submits a job, and its runner and huey consumers were half
    # of a server start's CPU (16 of 32 CPU-s on the CI machine) and eight processes on the head
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
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


def group_members(pgid: int) -> set[int]:
    """Live processes (zombies excluded) in process group `pgid`."""
    found = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.add(int(d.name))
    return found


def stop_group(pgid: int, timeout: float = 20) -> None:
    """End every process of the server's group: `mlflow server`, its uvicorn and, where
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION turned it on, its job runner with the huey
    consumers under it (all in the group the server was started in), SIGKILL for any
    still there after `timeout`; return once none is left, so the port is free for the
    next server."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not group_members(pgid):
            return
    raise RuntimeError(f"processes {sorted(group_members(pgid))} of the MLflow server survived SIGKILL")


def stop(proc: subprocess.Popen) -> None:
    """Stop a server `start` returned, with everything it started."""
    stop_group(proc.pid)  # start_new_session: its pid is its group's id
    proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.tracking_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend-store-uri", "--backend", dest="backend",
                   default=os.environ.get("MLFLOW_BACKEND_STORE_URI") or default_store(),
                   help="backend store URI: postgresql://USER@HOST:PORT/DB (password: PGPASSWORD or --password-file), "
                        "sqlite:///FILE, or any SQLAlchemy URL MLflow supports (default: MLFLOW_BACKEND_STORE_URI, "
                        "else the store every pipeline command uses by default, $VGG_HOME/mlflow.db, "
                        "~/.vgg by default)")
    p.add_argument("--password-secret", metavar="NAME",
                   help="AWS Secrets Manager secret whose value is the database password, read with the machine's "
                        "own credentials (on the head of ray_cluster.yaml: its instance profile), so the password "
                        "is in no file on any node")
    p.add_argument("--password-file", help="file whose first line is the database password (e.g. a mounted "
                                           "Kubernetes secret); default: PGPASSWORD from the environment")
    p.add_argument("--artifacts-destination", "--artifacts", dest="artifacts",
                   default=os.environ.get("MLFLOW_ARTIFACTS_DESTINATION") or str(home() / "mlartifacts"),
                   help="artifact root, proxied by the server: s3://bucket/prefix or a folder (default: "
                        "MLFLOW_ARTIFACTS_DESTINATION, else $VGG_HOME/mlartifacts, beside the default store)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--pid-file", help="file holding this server's process ids: a server it names that is still "
                                      "running is stopped (its whole process tree, port freed) before this one "
                                      "starts, so a restart command never needs pkill")
    p.add_argument("--detach", metavar="LOG", help="run in the background with all output in LOG; this command "
                                                   "returns once the server answers (exit 0) or has failed (exit 2, "
                                                   "with the log's tail), so a start script sees a failure")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default loopback; 0.0.0.0 only inside a private pod network, "
                        "as in cluster/k8s/raycluster.yaml)")
    a = p.parse_args(argv)
    if a.backend.startswith("sqlite:///"):
        Path(a.backend[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    password = None
    if a.password_secret:
        try:
            password = read_secret(a.password_secret)
        except RuntimeError as exc:
            print(f"tracking_server: {exc}", file=sys.stderr)
            return 2
    elif a.password_file:
        try:
            password = Path(a.password_file).read_text().splitlines()[0]
        except (OSError, IndexError):
            print(f"tracking_server: cannot read a password from {a.password_file}", file=sys.stderr)
            return 2
    ready = _detach(Path(a.detach)) if a.detach else None
    # SIGTERM (kill, systemd, a pid-file restart) ends the server's whole tree, not only
    # this process: the server runs in a session of its own and would keep the port.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        if a.pid_file:
            replace_previous(Path(a.pid_file))
        proc, url = start(a.backend, a.artifacts, a.port, host=a.host, password=password)
    except (ValueError, RuntimeError) as exc:
        print(f"tracking_server: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        if a.pid_file:
            Path(a.pid_file).parent.mkdir(parents=True, exist_ok=True)
            Path(a.pid_file).write_text(f"{os.getpid()} {proc.pid}\n")
        print(f"MLflow tracking server on {url} (backend {redact(a.backend)}, artifacts {a.artifacts})\n"
              f"  export MLFLOW_TRACKING_URI={url}\n  Ctrl-C stops it.", flush=True)
        if ready is not None:
            os.write(ready, b"ok")
            os.close(ready)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop(proc)


def _detach(log: Path) -> int:
    """Fork: the parent waits for the child's word and exits with it (0 once the server
    answers, 2 when the child ended first, with the log's tail); the child goes on in a
    session of its own with its output in `log`, and gets the pipe to say "ok" on."""
    log.parent.mkdir(parents=True, exist_ok=True)
    read, write = os.pipe()
    if os.fork():
        os.close(write)
        word = b""
        while chunk := os.read(read, 64):  # EOF: the child closed it, or died
            word += chunk
        if word == b"ok":
            print(f"tracking_server: started (log: {log})", flush=True)
            os._exit(0)
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        print(f"tracking_server: the server did not start; the end of {log}:\n{tail}", file=sys.stderr, flush=True)
        os._exit(2)
    os.close(read)
    os.setsid()
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    return write


def read_secret(name: str) -> str:
    """The SecretString of AWS Secrets Manager secret `name` (boto3, the machine's own
    credentials); a RuntimeError naming the secret when it cannot be read."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError
    from botocore.utils import InstanceMetadataRegionFetcher

    # boto3 takes no region from an EC2 instance's metadata by itself: ask it, as the head would
    region = boto3.session.Session().region_name or InstanceMetadataRegionFetcher(timeout=2).retrieve_region()
    if not region:
        raise RuntimeError(f"cannot read AWS secret {name!r}: no AWS region (set AWS_DEFAULT_REGION)")
    try:
        value = boto3.client("secretsmanager", region_name=region).get_secret_value(SecretId=name).get("SecretString")
    except (BotoCoreError, ClientError) as exc:
        raise RuntimeError(f"cannot read the database password from AWS secret {name!r}: {exc}") from None
    if not value:
        raise RuntimeError(f"AWS secret {name!r} has no string value (the database password)")
    return value.strip()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def replace_previous(pid_file: Path, timeout: float = 60) -> None:
    """Stop the server `pid_file` names, if it still runs: its wrapper (this module, which
    stops its tree on SIGTERM) and then whatever is left in the server's process group
    (all of it, were the wrapper killed with SIGKILL). Processes that are not this
    server's (a reused pid) are left alone."""
    try:
        wrapper, pgid = (int(x) for x in pid_file.read_text().split())
    except FileNotFoundError:
        return
    except ValueError:
        raise ValueError(f"{pid_file}: expected two process ids written by cluster.tracking_server") from None
    if _alive(wrapper) and b"cluster.tracking_server" in _cmdline(wrapper):
        os.kill(wrapper, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(wrapper) and time.monotonic() < deadline:
            time.sleep(0.1)
    if any(b"mlflow" in _cmdline(pid) for pid in group_members(pgid)):
        stop_group(pgid)

if __name__ == "__main__":
    sys.exit(main())
