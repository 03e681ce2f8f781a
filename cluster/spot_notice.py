"""A spot node's interruption notice as a Ray node drain (run on each spot GPU node).

EC2 announces a spot reclaim two minutes ahead in the instance metadata
(`spot/instance-action`: {"action": "terminate", "time": "2026-12-02T13:20:00Z"}); Ray
does not read it. This watcher polls it every 5 s (IMDSv2) and, on a notice, drains this
node with reason PREEMPTION and the notice's deadline (`ray drain-node`), which Ray
Train's preemption watcher turns into `ray.train.get_preemption_info()` for the stage:
it checkpoints inside the window and continues on the nodes that stay.

    nohup python cluster/spot_notice.py >> ~/spot_notice.log 2>&1 &   (ray_cluster.yaml)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone

IMDS = "http://169.254.169.254/latest"


def deadline_seconds(notice: dict, now: float) -> int:
    """Seconds left before the reclaim the notice announces (at least 1)."""
    when = datetime.strptime(notice["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    return max(1, int(when.timestamp() - now))


def _get(path: str, token: str) -> str | None:
    req = urllib.request.Request(f"{IMDS}/{path}", headers={"X-aws-ec2-metadata-token": token})
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            return r.read().decode()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:  # no notice
            return None
        raise


def _token() -> str:
    req = urllib.request.Request(f"{IMDS}/api/token", method="PUT",
                                 headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
    with urllib.request.urlopen(req, timeout=2) as r:
        return r.read().decode()


def main() -> int:
    token, since = _token(), time.monotonic()
    while True:
        if time.monotonic() - since > 6 * 3600 - 60:  # the token's ttl
            token, since = _token(), time.monotonic()
        try:
            body = _get("meta-data/spot/instance-action", token)
        except (urllib.error.URLError, OSError) as exc:
            print(f"spot_notice: instance metadata unreachable ({exc}); retrying", file=sys.stderr, flush=True)
            body = None
        if body:
            notice = json.loads(body)
            left = deadline_seconds(notice, time.time())
            print(f"spot_notice: {notice['action']} at {notice['time']} ({left} s): draining this node", flush=True)
            out = subprocess.run(["ray", "drain-node", "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                                  "--reason-message", f"spot {notice['action']} at {notice['time']}",
                                  "--deadline-remaining-seconds", str(left)], capture_output=True, text=True)
            print(out.stdout + out.stderr, flush=True)
            return 0 if out.returncode == 0 else 1
        time.sleep(5)


if __name__ == "__main__":
    sys.exit(main())
