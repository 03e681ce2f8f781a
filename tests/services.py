"""Real local services for the slow tests: Ray clusters started with `ray start` on
loopback, and MLflow tracking servers (cluster.tracking_server)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_pids(marker: str, node: int | None = None) -> set[int]:
    """This cluster's processes (or one node's: `node`): those with the marker variable in
    their environment (every process `ray start` spawns inherits it) and all their
    descendants (Ray's agents rename themselves, e.g. to ray::DashboardAgent, over their
    command line and environment, so only their parentage gives them away)."""
    needle = f"VGG_TEST_CLUSTER={marker}".encode() if node is None else f"VGG_TEST_NODE={marker}/{node}".encode()
    parent, found = {}, set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            stat = (proc / "stat").read_text()
            parent[int(proc.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                found.add(int(proc.name))
        except (OSError, ValueError, IndexError):
            pass
    grew = True
    while grew:
        kids = {pid for pid, ppid in parent.items() if ppid in found} - found
        found |= kids
        grew = bool(kids)
    return found


def _kill_cluster(marker: str, node: int | None = None, signals=(signal.SIGTERM, signal.SIGKILL)) -> None:
    """Stop only this cluster's processes, or one node's (`ray stop` would stop every Ray
    on the machine, other tests' included)."""
    pids = _cluster_pids(marker, node)  # before any dies, while the agents still have parents
    for sig in signals:
        for pid in pids | _cluster_pids(marker, node):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(1)


def signal_processes(pids, sig: int) -> list[int]:
    """Send `sig` to each of `pids` (SIGSTOP / SIGCONT: a test holds training still while
    it looks or acts); those that were still there."""
    sent = []
    for pid in pids:
        try:
            os.kill(pid, sig)
            sent.append(pid)
        except ProcessLookupError:
            pass
    return sent


def _signal_train_workers(marker: str, sig: int) -> list[int]:
    """Send `sig` to this cluster's Ray Train worker processes; their pids."""
    workers = []
    for pid in _cluster_pids(marker):
        try:
            if b"RayTrainWorker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                workers.append(pid)
        except OSError:
            pass
    return signal_processes(workers, sig)


def own_train_workers() -> list[int]:
    """Ray Train worker processes descended from this test process (its local Ray), never
    those of other Ray instances on the machine."""
    parent, workers = {}, []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            parent[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if b"RayTrainWorker" in (proc / "cmdline").read_bytes():
                workers.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            pass

    def ours(pid: int) -> bool:
        while pid > 1:
            pid = parent.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    return sorted(p for p in workers if ours(p))


@contextlib.contextmanager
def ray_cluster_on_loopback(name: str, nodes: list[dict]):
    """`ray start --head` plus one `ray start --address` per further node, all on
    127.0.0.1, sharing one generated auth token (Ray 2.60 turns token authentication
    on). Each node gets its own temp dir, as on separate machines: nodes sharing one
    would share, and garbage-collect under each other, the unpacked job working_dir.
    The venv is on PATH, as for a user who activated it: job entrypoints run `python`."""
    # Short temp dirs: Ray's socket paths must stay under 107 characters.
    temp_dir = Path(f"/tmp/rt{os.getpid()}{name}-")
    dirs = [Path(f"{temp_dir}{i}") for i in range(len(nodes))]
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    port, dash = free_port(), free_port()
    marker = f"{os.getpid()}-{name}-{secrets.token_hex(4)}"
    env = dict(os.environ, RAY_ADDRESS="", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
               VGG_TEST_CLUSTER=marker,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")

    def start(i: int, node: dict) -> None:
        d = Path(f"{temp_dir}{i}")
        dirs.append(d) if d not in dirs else None
        shutil.rmtree(d, ignore_errors=True)
        role = (["--head", "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                 "--ray-client-server-port", str(free_port())]
                if i == 0 else ["--address", f"127.0.0.1:{port}"])
        # Every agent port free, not Ray's fixed defaults (52365, ...): another Ray on
        # this machine (another test's cluster) would hold them and the agent would die,
        # which the Jobs API reports as "No available agent to submit job".
        agents = [(flag, str(free_port())) for flag in ("--dashboard-agent-listen-port",
                  "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")]
        args = ["start", *role, *[x for pair in agents for x in pair], "--node-ip-address", "127.0.0.1",
                "--temp-dir", str(d), "--num-cpus", str(node["cpus"]), "--resources", json.dumps(node.get("resources", {})),
                "--disable-usage-stats"]
        node_env = dict(env, VGG_TEST_NODE=f"{marker}/{i}")
        out = subprocess.run([RAY, *args], env=node_env, capture_output=True, text=True)
        if out.returncode != 0 and "timed out during startup" in out.stdout + out.stderr:
            # Ray gives a raylet 30 s (fixed in ray/_private/node.py) to register with the
            # GCS; with both cores busy a node start has missed that. As an autoscaler
            # would: remove the half-started node and start it once more.
            _kill_cluster(marker, i)
            shutil.rmtree(d, ignore_errors=True)
            out = subprocess.run([RAY, *args], env=node_env, capture_output=True, text=True)
        assert out.returncode == 0, f"ray {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"

    try:
        for i, node in enumerate(nodes):
            start(i, node)
        # add_node(i, {"cpus": 1}) starts node i (a new index: a node that rejoins);
        # kill_node(i) SIGKILLs node i's processes, as a lost machine.
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "env": env,
               "add_node": start, "kill_node": lambda i: _kill_cluster(marker, i, (signal.SIGKILL,)),
               "signal_train_workers": lambda sig: _signal_train_workers(marker, sig)}
    finally:
        _kill_cluster(marker)
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def mlflow_server(tmp_path: Path):
    """A real `mlflow server` (SQLite backend, local artifact root) on a free loopback port."""
    from cluster.tracking_server import start, stop

    proc, url = start(f"sqlite:///{tmp_path / 'server.db'}", str(tmp_path / "artifacts"), free_port(),
                      log=tmp_path / "mlflow-server.log")
    try:
        yield url
    finally:
        stop(proc)


def tiny_plan(tmp_path: Path, shards: Path, *, name: str, experiment: str, stages: dict, max_failures: int = 0,
              optim: dict | None = None, **recipe) -> Path:
    """A plan for the tiny test shards: nets at width 1/8 on 32-pixel crops, 2 CPU
    workers of one core, DALI with one thread. Recipe keys override the defaults."""
    import yaml

    base = dict(epochs=2, max_iterations=None, batch_size=16, crop=32, width_mult=0.125, init="kaiming",
                normalize_std=True, optim={"lr": 0.1, **(optim or {})})
    plan = dict(name=name, experiment=experiment, storage=str(tmp_path / "runs"),
                data=dict(root=str(shards), reader_threads=1), recipe=dict(base, **recipe),
                resources=dict(num_workers=2, cpus_per_worker=1, max_failures=max_failures), stages=stages)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def step_records(epochs: int, steps: int, every: int, checkpoint_every: int = 0) -> list[int]:
    """Global steps of a stage's per-interval MLflow records (`step/*`): every `every`
    steps of an epoch, at its mid-epoch checkpoints and at its end (`steps` an epoch)."""
    marks = set(range(every, steps, every)) | {steps}
    if checkpoint_every:
        marks |= set(range(checkpoint_every, steps, checkpoint_every))
    return sorted(e * steps + m for e in range(epochs) for m in marks)


@contextlib.contextmanager
def s3_server(bucket: str = "vgg-test", host: str = "127.0.0.1"):
    """moto's standalone S3 server on a free port of `host` (loopback unless other
    machines must reach it), with one bucket; the AWS environment (endpoint, dummy keys)
    for this process and its children."""
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", host, "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 60
        while True:  # until it answers
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        req = urllib.request.Request(f"{endpoint}/{bucket}", method="PUT")
        urllib.request.urlopen(req, timeout=10).close()
        yield {"endpoint": endpoint, "bucket": bucket, "env": env}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Postgres:
    """A real PostgreSQL 15 server for one test: initdb and pg_ctl run as the unprivileged
    `nobody` when this process is root (initdb refuses root), in a world-traversable temp
    dir, on a free loopback port, with a generated password (scram-sha-256 over TCP)."""

    def __init__(self):
        import tempfile

        # Directly under /tmp: `nobody` must traverse every parent (pytest's are private).
        self.dir = Path(tempfile.mkdtemp(prefix="vgg-pg-", dir="/tmp"))
        self.dir.chmod(0o755)
        self.data, self.port, self.password = self.dir / "data", free_port(), secrets.token_hex(12)
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
        self.bin = bins[-1] if bins else Path(shutil.which("initdb") or "/usr/bin/initdb").parent
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.dir, "nobody")
            shutil.chown(pwfile, "nobody")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth-local=trust",
                  "--auth-host=scram-sha-256", f"--pwfile={pwfile}")
        pwfile.unlink()
        self.start()
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "mlflow")

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bin / tool), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "nobody", "--", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PGPASSWORD=self.password),
                             cwd=self.dir)
        assert out.returncode == 0, f"{tool} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"

    @property
    def uri(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/mlflow"

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"), "-w", "start", "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_for(predicate, timeout: float, what: str, slowest: float = 0.25):
    """`predicate()`'s first truthy value, or an error after `timeout` s. Polled every 50 ms
    at first, then less often, up to every `slowest` s: many predicates query MLflow or scan
    /proc (an MLflow SQLite query is about 17 ms of CPU here), and a wait of a minute at a
    fixed 50 ms took a third of a core from the tests running beside it."""
    deadline, pause = time.monotonic() + timeout, 0.05
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(pause)
        pause = min(pause * 1.25, slowest)
    raise AssertionError(f"timed out waiting for {what}")


def stage_history(uri: str, experiment: str, stage: str, metric: str):
    """(the stage's MLflow runs, the metric's history in the first of them)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.stage = '{stage}' and tags.kind = 'stage'")
    return runs, (client.get_metric_history(runs[0].info.run_id, metric) if runs else [])
