"""The documentation runs as shown. Every fenced `bash` block of README.md and docs/*.md
is read here, command by command (continuation lines joined, comments dropped):

- a block after `<!-- not run here: REASON -->` needs what this machine lacks (a GPU,
  AWS, a Kubernetes cluster); it must say why, and its commands are not run;
- every other command is checked by the program that will run it: `python -m pipeline`,
  `python data_prep/shard.py` and `python -m cluster.*` through their own argument
  parsers, then, for plans, through the plan loader (keys, overrides) and the plan's
  stage names (`evaluate --stage`, `ensemble` members); `make` through `make -n`;
- commands after `<!-- runs in CI -->` are also run, from the repository root, and a
  ```text block right after a command block quotes output that the run must print
  (lines with "..." are elisions).

A stage name, an option or a plan key that the code no longer has fails here, not in a
user's first hour."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
NOT_RUN = re.compile(r"<!--\s*not run here:\s*(\S.*?)\s*-->")
RUNS = "<!-- runs in CI -->"


def blocks(page: Path):
    """(line, language, text, marker line before the fence, quoted output after it)."""
    lines = page.read_text().splitlines()
    i, found = 0, []
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        before = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        quoted, after = None, j + 1
        k = j + 1
        while k < len(lines) and not lines[k].strip():
            k += 1
        if k < len(lines) and lines[k].startswith("```text"):
            end = k + 1
            while end < len(lines) and not lines[end].startswith("```"):
                end += 1
            quoted, after = lines[k + 1:end], end + 1
        found.append((i + 1, m.group(1), "\n".join(lines[i + 1:j]), before, quoted))
        i = after
    return found


def commands(text: str) -> list[list[str]]:
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(words)
    return out


def shell_blocks():
    for page in PAGES:
        for line, lang, text, before, quoted in blocks(page):
            if lang in ("bash", "sh", "shell"):
                yield pytest.param(page, line, text, before, quoted, id=f"{page.name}:{line}")


class Parsed(Exception):
    pass


def parse(main, argv: list[str], monkeypatch) -> argparse.Namespace:
    """What `main(argv)` would run with, from its own parser (stopped right after parsing)."""
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    try:
        main(argv)
    except Parsed as done:
        return done.args[0]
    finally:
        monkeypatch.undo()
    raise AssertionError(f"{argv}: the program returned without parsing its arguments")


def plan_stages() -> dict[str, set[str]]:
    """experiment -> stage names, from the shipped plans."""
    from pipeline.stages import load_plan

    out = {}
    for path in sorted((REPO / "pipeline" / "plans").glob("*.yaml")):
        plan = load_plan(path)
        out.setdefault(plan.experiment, set()).update(plan.stages)
    return out


def check(words: list[str], monkeypatch) -> None:
    """One documented command, checked by the program that runs it."""
    while re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):  # VAR=value before the program
        words = words[1:]
    prog, args = words[0], words[1:]
    if prog in ("python", "python3") and args[:2] == ["-m", "pipeline"]:
        from pipeline.cli import main

        a = parse(main, args[2:], monkeypatch)
        plan = getattr(a, "plan", None)
        if plan:
            from pipeline.stages import load_plan

            load_plan(REPO / plan if not Path(plan).is_absolute() else plan, getattr(a, "overrides", []))
        experiment = getattr(a, "experiment", None)
        names = [getattr(a, "stage", None)] + (getattr(a, "members", None) or [])
        if experiment in plan_stages():
            for name in filter(None, names):
                assert name in plan_stages()[experiment], f"{experiment} has no stage {name!r}"
    elif prog in ("python", "python3") and args and args[0] == "data_prep/shard.py":
        from data_prep.shard import main

        parse(main, args[1:], monkeypatch)
    elif prog in ("python", "python3") and args[:1] == ["-m"] and args[1].startswith("cluster."):
        import importlib

        a = parse(importlib.import_module(args[1]).main, args[2:], monkeypatch)
        if getattr(a, "plan", None):
            from pipeline.stages import load_plan

            load_plan(REPO / a.plan, getattr(a, "overrides", []))
    elif prog == "make":
        out = subprocess.run(["make", "-n", *args], cwd=REPO, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    elif prog in ("source", "export", "mkdir", "cd", "ray", "mlflow", "open", "kubectl", "docker", "podman"):
        raise AssertionError(f"`{shlex.join(words)}` cannot be checked here: mark its block "
                             "<!-- not run here: why -->, or move it to one that is")
    else:
        raise AssertionError(f"no check for `{shlex.join(words)}`")


@pytest.mark.parametrize("page, line, text, before, quoted", list(shell_blocks()))
def test_every_documented_command_runs_as_shown(page, line, text, before, quoted, monkeypatch):
    skip = NOT_RUN.search(before)
    if skip:
        assert len(skip.group(1)) > 10, f"{page.name}:{line}: say why it is not run here"
        return
    cmds = commands(text)
    assert cmds, f"{page.name}:{line}: an empty command block"
    for words in cmds:
        check(words, monkeypatch)
    if RUNS in before:
        printed = ""
        for words in cmds:
            env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
            out = subprocess.run(words, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
            assert out.returncode == 0, f"{page.name}:{line}: `{shlex.join(words)}`\n{out.stderr[-2000:]}"
            printed += out.stdout
        for quote in quoted or []:
            if quote.strip() and "..." not in quote:
                assert quote.strip() in printed, f"{page.name}:{line}: quoted output not printed: {quote!r}"
    else:
        assert quoted is None, f"{page.name}:{line}: quoted output must come from a run: mark it {RUNS}"


def test_the_reader_sees_blocks_markers_and_quotes(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("x\n<!-- not run here: needs an AWS account -->\n```bash\nray up c.yaml  # head\n```\n\n"
                    "```bash\npython -m pipeline models \\\n    A\n```\n```text\nA  11\n```\n")
    (first, second) = blocks(page)
    assert NOT_RUN.search(first[3]).group(1) == "needs an AWS account" and first[4] is None
    assert commands(second[2]) == [["python", "-m", "pipeline", "models", "A"]] and second[4] == ["A  11"]


def test_a_stale_command_fails_the_check(monkeypatch):
    with pytest.raises(AssertionError, match="has no stage 'D_jit'"):
        check(["python", "-m", "pipeline", "ensemble", "D_jit", "E-multi", "--experiment", "vgg-paper"], monkeypatch)
    with pytest.raises(SystemExit):
        check(["python", "-m", "pipeline", "train", "--plan", "pipeline/plans/demo.yaml", "--no-such-flag"],
              monkeypatch)
