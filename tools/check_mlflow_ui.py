"""Check in a real browser that our MLflow experiments open on the model-training view.

    python tools/check_mlflow_ui.py                          # a throwaway server and experiment
    python tools/check_mlflow_ui.py --url http://127.0.0.1:5000 --experiment vgg-demo

Opens the experiment link the pipeline prints (`pipeline.tracking.experiment_link`) in
headless Chromium (Debian's `chromium`: apt-get install chromium), waits for the page's
scripts, and checks the rendered page: the Runs view of the experiment, with the stage
run's name, not the GenAI overview (traces, token cost). Writes a screenshot outside the
repository (default /tmp/mlflow-ui.png). Exit 0 when the page is right.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GENAI_ONLY = ("Token Usage", "Tokens per Trace", "Cost Over Time")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise SystemExit("check_mlflow_ui: no Chromium found (Debian: apt-get install chromium)")


def render(url: str, screenshot: Path) -> str:
    base = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
            "--window-size=1400,900"]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, timeout=180)
    return dom


def demo_experiment(tmp: Path) -> tuple[object, str, str]:
    """A tracking server with one plan run and one stage run made by our Tracker."""
    import socket

    from cluster import tracking_server
    from pipeline.tracking import Tracker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc, url = tracking_server.start(f"sqlite:///{tmp / 'mlflow.db'}", str(tmp / "artifacts"), port,
                                      log=tmp / "server.log")
    tracker = Tracker(url, "ui-check")
    parent, _ = tracker.parent_run("ui-check-1", {}, {"plan": "ui-check"})
    tracker.stage_run(parent, "ui-check-1", "A", {"arch": "A"},
                      {"arch": "A", "stage": "A", "train_scale": "256", "init_from": "random"})
    return proc, url, "ui-check"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running tracking server (default: start a throwaway one)")
    p.add_argument("--experiment", help="experiment name (with --url)")
    p.add_argument("--screenshot", default=str(Path(tempfile.gettempdir()) / "mlflow-ui.png"))
    a = p.parse_args(argv)
    from pipeline.tracking import _client, experiment_link

    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        if a.url:
            url, name = a.url, a.experiment or sys.exit("--experiment is needed with --url")
        else:
            proc, url, name = demo_experiment(Path(tmp))
        try:
            exp = _client(url).get_experiment_by_name(name)
            if exp is None:
                print(f"check_mlflow_ui: no experiment {name!r} at {url}", file=sys.stderr)
                return 2
            link = experiment_link(url, exp.experiment_id)
            dom = render(link, Path(a.screenshot))
        finally:
            if proc is not None:
                from cluster import tracking_server

                tracking_server.stop(proc)
    title = re.search(r"<title>([^<]*)</title>", dom)
    problems = []
    if not title or not title.group(1).startswith("Runs - "):
        problems.append(f"page title {title.group(1) if title else None!r}, expected the experiment's Runs view")
    problems += [f"GenAI view element {word!r} on the page" for word in GENAI_ONLY if word in dom]
    print(f"{link}: {'OK, model-training view' if not problems else 'WRONG VIEW'}; screenshot {a.screenshot}")
    for line in problems:
        print(f"  {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
