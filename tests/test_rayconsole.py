"""The driver's Ray console: Ray's known-harmless internal lines are dropped, everything
else passes; and the driver's local Ray tells its own processes where it is, so Ray
Train's PlacementGroupCleaner (which asks the State API without an address) works with
another Ray instance on the machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.rayconsole import filtered

REPO = Path(__file__).resolve().parent.parent

# As Ray 2.60 prints them on a normal run (copied from a demo run's console)
PREEMPTION = ("[2026-12-02 13:30:21,212 E 7045 7076] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
              "and ID: 'c95e60b4fd44f0c0b79cd18001000000' has constructor arguments in the object store and "
              "max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor "
              "restart will fail. See https://github.com/ray-project/ray/issues/53727 for more details.")
SNAPSHOT = ["A run snapshot was found in storage folder at: '/tmp/runs/demo/demo-A'",
            "This snapshot contains a list of checkpoints reported via `ray.train.report` and will be loaded. "
            "This allows the latest checkpoint found in the snapshot to be accessible within your training "
            "function via `ray.train.get_checkpoint`.",
            "If you meant to start a brand new training job without any information about previous checkpoints "
            "found in this directory, please configure a new, unique `RunConfig(name)` or delete the existing "
            "folder at '/tmp/runs/demo/demo-A'."]


RESOURCE_TIMEOUT = [
    "Failed to send resource request for train-6f995f0fddde490ca868b3148bda7e2d. If this only happens transiently "
    "during network partition or CPU being overloaded, it's safe to ignore this error. If this error persists, file "
    "a GitHub issue.",
    "Traceback (most recent call last):",
    '  File ".../ray/train/v2/_internal/execution/scaling_policy/autoscaling_coordinator_client.py", line 58, '
    "in send_resource_request",
    "    ray.get(",
    '  File "python/ray/includes/common.pxi", line 107, in ray._raylet.check_status',
    "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready."]
MUTEX = ["[mutex.cc : 452] RAW: Lock blocking 0x5609d7fe2be0   @ 0x7f780b22b1a2 0x7f780a2fb23c",
         "[mutex.cc : 452] RAW: Lock returning 0x5609d7fe2be0   @ 0x7f780b22b1a2 0x7f780a2fb23c",
         "[mutex.cc : 452] RAW: Unlock 0x5609d7fe2be0   @ 0x7f780abc2037 0x7f780b24c3b0"]


def batch(lines):
    return {"ip": "127.0.0.1", "pid": 7045, "actor_name": "TrainController", "task_name": None, "is_err": True,
            "lines": lines}


def test_the_named_harmless_lines_are_dropped_and_nothing_else():
    assert filtered(batch([PREEMPTION])) is None
    assert filtered(batch(SNAPSHOT)) is None
    assert filtered(batch(MUTEX)) is None
    after = "Attempting to start training worker group of size 2"
    assert filtered(batch(RESOURCE_TIMEOUT + [after]))["lines"] == [after]  # the block ends at its exception
    real = ["Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
            "ValueError: PreemptionWatcher failed: has constructor arguments",  # the same words, a real error
            "Requesting resources: {'CPU': 1.0} * 2"]
    assert filtered(batch(real))["lines"] == real
    mixed = filtered(batch([real[0], PREEMPTION, real[2]]))
    assert mixed["lines"] == [real[0], real[2]] and mixed["pid"] == 7045


@pytest.mark.slow
def test_the_drivers_processes_find_their_own_cluster_beside_another(ray_cluster):
    """With a second Ray on the machine (this session's), a task of the driver's local
    Ray asks the State API without an address, as PlacementGroupCleaner does: it must
    reach its own cluster ("Found multiple active Ray instances" without the fix)."""
    code = """
import ray
from pipeline import rayconsole
rayconsole.start_local(1, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)

@ray.remote(num_cpus=0)
def actors_seen():
    from ray.util.state import list_actors
    return [a.class_name for a in list_actors()]

@ray.remote(num_cpus=0)
class Marker:
    def ping(self):
        return 1

m = Marker.remote()
ray.get(m.ping.remote())
print("SEEN", sorted(ray.get(actors_seen.remote(), timeout=120)))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=240,
                         env={k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "SEEN ['Marker']" in out.stdout, out.stdout[-2000:]
