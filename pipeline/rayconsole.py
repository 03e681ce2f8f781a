"""The driver's Ray: a local instance its own actors can find, and a console without
Ray's known-harmless internal chatter.

What Ray prints on normal runs that says nothing to our users is dropped from the
console, a named list (`HARMLESS`, `HARMLESS_BLOCKS`); each line is still in the worker
log files Ray writes under its session's `logs/`. For example:

- Ray Train creates its `PreemptionWatcher` actor with its arguments in the object
  store and restarts allowed, and Ray's core worker logs that combination at E level
  for every stage, although nothing is wrong;
- on a resume, Ray Train's checkpoint manager explains in three lines how to start
  afresh with "a new, unique RunConfig(name)", a name our users never choose (the
  plan run's name is; our own line says "resumed at epoch N step S").

Everything else a worker prints reaches the console unchanged: errors, tracebacks and
every line we did not name here.

A third came from a real fault: Ray Train's `PlacementGroupCleaner` actor asks the State
API for its controller without an address, and with two Ray instances on the machine
(another user's, a test's) it dies with "Found multiple active Ray instances", leaving
nothing to remove the placement group of a crashed controller. `start_local` fixes the
cause: every process of the driver's job is told which cluster it belongs to.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import socket

# Lines of the worker stream that are dropped from the console, by what they start with
# once Ray's "(Actor pid=...)" prefix and any log prefix are stripped.
HARMLESS = (
    re.compile(r".*core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher' .*has constructor arguments"),
    re.compile(r"A run snapshot was found in storage folder at: "),
    re.compile(r"This snapshot contains a list of checkpoints reported via `ray\.train\.report`"),
    re.compile(r"If you meant to start a brand new training job without any information about previous"),
    # abseil's mutex tracing, which some of Ray's C++ prints from a forked worker on a busy machine
    re.compile(r"\[mutex\.cc : \d+\] RAW: (Lock blocking|Lock returning|Unlock) 0x"),
)
# Blocks dropped whole: a first line, then every line up to and including the last one.
# Ray Train's resource request to its autoscaling coordinator timed out on a busy machine:
# Ray logs it with its traceback and "safe to ignore" when transient, and retries; a stage
# that stays unplaced is reported by our own waiting note (pipeline/runner.py).
HARMLESS_BLOCKS = (
    (re.compile(r"Failed to send resource request for train-\w+\. If this only happens transiently"),
     re.compile(r"ray\.exceptions\.GetTimeoutError: ")),
)
_HANDLER = "ray_print_logs"  # the name ray.init gives its console handler (ray/_private/worker.py)


def harmless(line: str) -> bool:
    return any(p.match(line.strip()) for p in HARMLESS)


def _kept(lines: list[str]) -> list[str]:
    kept, until = [], None
    for line in lines:
        text = line.strip()
        if until is not None:
            if until.match(text):
                until = None
            continue
        block = next((end for start, end in HARMLESS_BLOCKS if start.match(text)), None)
        if block is not None:
            until = block
        elif not harmless(line):
            kept.append(line)
    return kept


def filtered(data: dict) -> dict | None:
    """A batch of one worker's lines without the harmless ones (None: nothing left). A
    block whose last line is not in the batch is dropped to the batch's end."""
    lines = _kept(data.get("lines", []))
    if not lines:
        return None
    return dict(data, lines=lines) if len(lines) != len(data.get("lines", [])) else data


def quiet_console() -> None:
    """Put the filter in front of Ray's printing of worker output in this driver. A no-op
    when this Ray does not print worker output (log_to_driver=False) or names its
    handler differently (then the lines show, as before)."""
    from ray._private import ray_logging, worker

    dispatcher = ray_logging.global_worker_stdstream_dispatcher
    if not any(name == _HANDLER for name, _ in dispatcher.handlers):
        return
    ignore_prefix = worker._should_ignore_worker_log_prefix(worker.global_worker)
    show = functools.partial(worker.print_to_stdstream, ignore_prefix=ignore_prefix)

    def handler(data):
        kept = filtered(data)
        if kept is not None:
            show(kept)

    dispatcher.remove_handler(_HANDLER)
    dispatcher.add_handler(_HANDLER, handler)  # same name: ray.shutdown removes it


def start_local(num_cpus: int, **kwargs) -> None:
    """A single-node Ray for this driver whose every worker and actor (Ray Train's
    detached ones included) has RAY_ADDRESS set to it.

    The address reaches them through the environment of the node's own processes, which
    its raylet passes on to every worker it starts, not through a runtime_env: a job with
    a runtime_env has each worker start as Ray's setup_worker.py, a Python with Ray's
    imports that then replaces itself with the worker, after a runtime-env agent call
    (about half a CPU-second more per worker: bench/results/local-driver-cpu.json)."""
    import ray

    with socket.socket() as s:  # a free port for the GCS, so its address is known before start
        s.bind(("", 0))
        port = s.getsockname()[1]
    address = f"{ray.util.get_node_ip_address()}:{port}"
    # read by the node this ray.init starts; address="local" below has ray.init start a node
    # whatever RAY_ADDRESS says (and whatever /tmp/ray/ray_current_cluster, left by a `ray
    # start` even one that crashed, names: a plain ray.init would try to join that one)
    saved = {key: os.environ.get(key) for key in ("RAY_GCS_SERVER_PORT", "RAY_ADDRESS")}
    os.environ.update(RAY_GCS_SERVER_PORT=str(port), RAY_ADDRESS=address)
    # Ray announces at WARNING that this private instance uses token authentication (and at
    # INFO where it saved a new token): right for a cluster others reach, noise here.
    token_setup = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = token_setup.level
    token_setup.setLevel(logging.ERROR)
    try:
        ray.init(address="local", num_cpus=num_cpus, **kwargs)
    finally:
        token_setup.setLevel(level)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    quiet_console()


def connect(address: str) -> None:
    import ray

    ray.init(address=address)
    quiet_console()
