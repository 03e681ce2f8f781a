"""Shared fixtures: a small real image tree, its real shards, a real Ray cluster and a
real MLflow SQLite store. Nothing here is mocked."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# Ray Train's controller polls its workers every 2 s, and a report (each epoch, each
# checkpoint) waits for a poll: on these tiny stages that was most of a Ray test's time
# (measured here: a 10-report run took 67-86 s at 2 s, 29-49 s at 0.2 s). Every Ray the
# tests start, in this process or in a subprocess, inherits this environment.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray Train's preemption watcher is one more actor process (a Python with Ray Train's
# imports: about 3 CPU-s here) at every worker-group start, and it only acts when a node
# is drained. Off for the tests that drain no node; on (as users run) in those that drain
# one (test_elastic) or run a user's whole command and check its console (the demo, Ctrl-C),
# and in `ray up`'s cluster (test_ray_up), whose nodes have their own environment as a user's do.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Two background costs of the Rays the tests start on this machine (a dozen or more, each
# alive for minutes; not `ray up`'s nodes, which have their own environment), measured on an
# idle 2-CPU head here: 4.5 CPU-s a minute as Ray ships, 3.4 with these. Ray's own metrics
# (the agents' and workers' exports to a Prometheus no test reads; the `system/*` figures
# come from psutil) are off, and the log monitor looks for new log files every 0.5 s (Ray's
# own pace past 1,000 files) instead of on every pass of its loop (every 0.1 s when idle).
# A new file is read from its start, so no line is lost; a new worker's lines can reach
# the driver up to half a second later.
os.environ.setdefault("RAY_enable_metrics_collection", "0")
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")

# `make test` runs the files on three pytest-xdist workers (--dist loadfile: a file's tests
# and its module fixtures stay on one worker), handed out in this order. A worker takes
# its next unit when one test of its own is left (below), so a one-test file takes the
# next unit as it starts; the order is the one that ends the three workers closest
# together when the per-test durations of a three-worker run (4ef6bc2) are replayed
# under that rule: 933 s against 992 for the longest-first order with one in-process Ray
# unit (which ran 90 s past the others). The in-process Ray units come first.
HAND_OUT_ORDER = ["test_parallel.py", "test_failures.py", "test_train.py", "test_tracking_server.py",
                  "test_foreign.py", "test_protocols.py", "test_rayconsole.py", "test_shard.py",
                  "test_elastic.py", "test_retrain.py", "test_s3.py", "test_ray_up.py", "test_tracking.py",
                  "test_cli.py", "test_multinode.py", "test_corrupt.py", "test_data.py"]


# The files whose tests use their process's Ray (ray_cluster), by the unit they go out
# in: a unit's files run one after another on one worker, which starts that Ray once.
# Handed out file by file, they met other files in between, and each meeting cost a
# restart (ray.init and a first task: about 9 CPU-s here; up to one for each of the eight
# files). Two units: about 530 and 460 test-seconds on three workers.
IN_PROCESS_RAY = {"test_parallel.py": "ray-1", "test_failures.py": "ray-1",
                  "test_train.py": "ray-2", "test_tracking_server.py": "ray-2", "test_protocols.py": "ray-2",
                  "test_foreign.py": "ray-2", "test_rayconsole.py": "ray-2", "test_shard.py": "ray-2"}


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HAND_OUT_ORDER)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file
    unlisted = sorted({item.path.name for item in items if "ray_cluster" in item.fixturenames} - set(IN_PROCESS_RAY))
    if unlisted:
        raise pytest.UsageError(f"{', '.join(unlisted)} use(s) ray_cluster: add to IN_PROCESS_RAY in tests/conftest.py")


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's --dist loadfile, with the IN_PROCESS_RAY files as their units (its own
    --dist loadgroup cannot do this with pytest 9.2, whose node ids it can no longer edit),
    and a worker given its next unit only when one test of its own is left. loadfile gives
    it when two are: a worker running one-test files (the retrain schedule, `ray up`, the
    elastic test: minutes each) held the next long one while the other worker ran out of
    work (at 5dc97a7: 1,283 against 1,179 test-seconds). One is the least: a worker runs a
    test only once it knows the next (or that none is coming)."""
    from xdist.scheduler import LoadFileScheduling

    if config.getvalue("dist") != "loadfile" or not all(
            hasattr(LoadFileScheduling, name) for name in ("_split_scope", "_pending_of", "_assign_work_unit")):
        return None  # another mode, or a pytest-xdist whose internals moved: its own scheduling

    class SharingTheTestRay(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return IN_PROCESS_RAY.get(Path(scope).name, scope)

        def _reschedule(self, node) -> None:
            if node.shutting_down:
                return
            if not self.workqueue:
                node.shutdown()
            elif self._pending_of(self.assigned_work[node]) <= 1:
                self._assign_work_unit(node)

    return SharingTheTestRay(config, log)


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory) -> Path:
    """6 classes x 24 train + 8 val real JPEGs in ImageNet's folder layout."""
    from data_prep.synth import make_dataset

    return make_dataset(tmp_path_factory.mktemp("imagenet"), train_per_class=24, val_per_class=8,
                        min_side=64, max_side=120)


@pytest.fixture(scope="session")
def shards(image_tree, tmp_path_factory) -> Path:
    from data_prep.shard import build

    out = tmp_path_factory.mktemp("shards")
    build(image_tree, out, samples_per_shard=20, workers=1, progress=False)
    return out


_OURS: dict[str, str] = {}  # the GCS address of the Ray that ray_cluster started


def _stop_ray() -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def ray_cluster():
    """A local Ray instance in this test process, sized like this 2-core machine: started
    by the first test that asks for it and kept for the tests after it, up to the first
    test file that does not use it (_ray_only_where_used)."""
    import ray

    if ray.is_initialized() and ray.get_runtime_context().gcs_address != _OURS.get("gcs"):
        ray.shutdown()  # a Ray this fixture did not start (product code's own): not the one the tests assume
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        _OURS["gcs"] = ray.get_runtime_context().gcs_address
    return ray


@pytest.fixture(scope="module", autouse=True)
def _ray_only_where_used(request):
    """Stop this test process's Ray before a file none of whose tests uses it. An idle
    head costs 3-4 CPU-s a minute here, and the files without it include the longest ones
    (the retrain schedule, `ray up`, the demo: minutes each, beside their own Rays). Under
    `make test` the files that use it run together in their units (IN_PROCESS_RAY), so it
    starts once per unit."""
    if not any("ray_cluster" in item.fixturenames for item in request.session.items if item.path == request.path):
        _stop_ray()
    yield


@pytest.fixture(scope="session", autouse=True)
def _ray_stopped_at_the_end():
    yield
    _stop_ray()


@pytest.fixture(scope="session")
def mlflow_store_template(tmp_path_factory) -> Path:
    """An empty SQLite tracking store with MLflow's schema already migrated: creating one
    runs every migration (seconds of CPU), so tests start from copies of this one."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_uri(tmp_path, mlflow_store_template) -> str:
    shutil.copyfile(mlflow_store_template, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
