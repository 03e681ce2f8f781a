"""Ray 2.60's token authentication, as a user meets it on a head started in token mode
with a token (as ray_cluster.yaml starts it): cluster.submit and cluster.retrain find
the token as Ray's own clients do (the
RAY_AUTH_TOKEN variable or ~/.ray/auth_token) and, with none, stop before submitting
with the commands to run. A real head on loopback; nothing is mocked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from services import ray_cluster_on_loopback

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def test_token_is_found_in_ray_token_file_and_its_absence_is_explained(tmp_path):
    with ray_cluster_on_loopback("auth", [{"cpus": 1, "resources": {}}]) as cluster:
        token = cluster["env"]["RAY_AUTH_TOKEN"]
        home = tmp_path / "home"
        home.mkdir()
        bare = {k: v for k, v in cluster["env"].items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE",
                                                                      "RAY_AUTH_TOKEN_PATH")}
        bare.update(HOME=str(home), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'never.db'}")
        for tool in ("cluster.submit", "cluster.retrain"):
            out = subprocess.run([sys.executable, "-m", tool, "--plan", "pipeline/plans/demo.yaml", "--address",
                                  cluster["dashboard"], "--set", f"storage={tmp_path / 'runs'}", "--storage-is-shared"],
                                 cwd=REPO, env=bare, capture_output=True, text=True,
                                 timeout=120)
            assert out.returncode == 2, out.stderr[-2000:]
            assert "uses token authentication and no token was found" in out.stderr
            assert "ray get-auth-token" in out.stderr and "export RAY_AUTH_TOKEN=" in out.stderr
        # nothing was submitted (the head has no jobs); with the token in Ray's file, the client works
        (home / ".ray").mkdir()
        (home / ".ray" / "auth_token").write_text(token)
        probe = ("from cluster import jobs; c = jobs.client(%r); print('jobs:', len(c.list_jobs()))"
                 % cluster["dashboard"])
        out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=bare, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0 and "jobs: 0" in out.stdout, out.stderr[-2000:]
        # and from the variable, as `export RAY_AUTH_TOKEN=...` gives it
        env = dict(bare, HOME=str(tmp_path), RAY_AUTH_TOKEN=token)
        out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0 and "jobs: 0" in out.stdout, out.stderr[-2000:]
