"""Run a command and say where the machine's CPU went while it ran, by kind of process.

    python tools/cpu_by_process.py -- bash -c 'git clone -q . /tmp/ci && cd /tmp/ci && CI=true bash .ci/run'

Every process on the machine is read from /proc once a second (user + system time) and
named by its command line: Ray's workers by their `ray::` actor or task name (read again
until the worker has one: a worker starts as Python running Ray's setup_worker.py or
default_worker.py, and an idle one is `ray::IDLE`; a pooled worker keeps the name of the
first task it ran), Python by its `-m` module or script, anything else by its program. A
process that lives under a second can be missed and one can lose up to a second after its
last pass, so the total is a lower bound; one already running counts only what it spends
while the command runs. Before and after, a fixed
20-million-step Python loop is timed on the idle machine: this VM's speed changes with its
host's load, so a figure compares only with figures whose loop times are alike. The
figures for `make test` are in bench/results/suite-cpu.json."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import defaultdict

HZ = os.sysconf("SC_CLK_TCK")
UNSETTLED = ("setup_worker.py", "default_worker.py", "python", "ray::IDLE")


# bench/results/suite-cpu.json's loop_reference, as it was recorded (module level, so
# slower than the same loop in a function)
LOOP = "import time;t=time.process_time();s=0\nfor i in range(20_000_000): s+=i\nprint(time.process_time()-t)"


def loop_seconds() -> float:
    """CPU seconds of a fixed pure-Python loop: the machine's speed right now."""
    out = subprocess.run([sys.executable, "-c", LOOP], capture_output=True, text=True, check=True)
    return round(float(out.stdout), 2)


def kind(pid: int) -> str | None:
    try:
        argv = [a.decode(errors="replace") for a in open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0") if a]
    except OSError:
        return None
    if not argv:
        return None
    if len(argv) == 1 and " " in argv[0]:  # a process that rewrote its command line as one string
        argv = argv[0].split()
    if argv[0].startswith("ray::"):
        return argv[0].split()[0].split(".")[0]  # ray::Actor.method -> ray::Actor
    program = os.path.basename(argv[0])
    if not program.startswith("python"):
        return program
    rest = [a for a in argv[1:] if not a.startswith("-") or a == "-m"]
    if rest[:1] == ["-m"] and len(rest) > 1:
        return f"python -m {rest[1]}"
    return next((os.path.basename(a) for a in rest if a.endswith(".py")), "python")


def command_line(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"


Process = tuple[int, int]  # (pid, start time): a pid the kernel hands out again is another process


def sample(seen: dict[Process, tuple[str, int]], lines: dict[Process, str], detail: list[str]) -> None:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            stat = open(f"/proc/{pid}/stat").read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        key = (pid, int(fields[19]))
        name = seen.get(key, (None, 0))[0]
        if name is None or name in UNSETTLED:
            name = kind(pid) or name
        if name:
            seen[key] = (name, int(fields[11]) + int(fields[12]))
            if name in detail and key not in lines:
                lines[key] = command_line(pid)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="+", help="the command to run (after --)")
    parser.add_argument("--top", type=int, default=20, help="kinds to list")
    parser.add_argument("--detail", action="append", default=[], metavar="KIND",
                        help="also list this kind's ten busiest processes with their command lines")
    args = parser.parse_args()
    before = loop_seconds()
    seen: dict[Process, tuple[str, int]] = {}
    lines: dict[Process, str] = {}
    sample(seen, lines, args.detail)
    already = {key: ticks for key, (_, ticks) in seen.items()}  # the machine's own processes: only their growth
    started = time.monotonic()
    proc = subprocess.Popen(args.command)
    while proc.poll() is None:
        sample(seen, lines, args.detail)
        time.sleep(1)
    sample(seen, lines, args.detail)  # what the command's last processes did after the last pass
    wall = time.monotonic() - started
    after = loop_seconds()
    by_kind = defaultdict(lambda: [0.0, 0])
    for key, (name, ticks) in seen.items():
        spent = (ticks - already.get(key, 0)) / HZ
        if spent > 0 and key[0] != os.getpid():
            by_kind[name][0] += spent
            by_kind[name][1] += 1
    total = sum(cpu for cpu, _ in by_kind.values())
    print(f"exit {proc.returncode}; {wall:.0f} s wall, {total:.0f} CPU-s sampled "
          f"({total / wall:.2f} cores); loop {before} CPU-s before, {after} after")
    for name, (cpu, count) in sorted(by_kind.items(), key=lambda item: -item[1][0])[:args.top]:
        print(f"{cpu:8.1f} CPU-s {count:5d}  {name}")
    for name in args.detail:
        busiest = sorted(((ticks - already.get(key, 0)) / HZ, key) for key, (n, ticks) in seen.items() if n == name)
        print(f"{name}, busiest:")
        for cpu, key in busiest[::-1][:10]:
            print(f"{cpu:8.1f} CPU-s  {lines.get(key, '?')}")
    return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode  # killed by a signal: as a shell says


if __name__ == "__main__":
    sys.exit(main())
