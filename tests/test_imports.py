"""The house's import graph, read from the source (every import statement, those inside
functions too): no circle, no module importing from a package or a layer above its own,
and each third-party framework imported by its one owner (DESIGN.md)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("data_prep", "pipeline", "cluster")  # lowest first: a package imports only itself and those before it
# The command layer: what users run. Nothing below it may import it back.
COMMANDS = ("pipeline.__main__", "pipeline.cli", "pipeline.bench")
OWNERS = {"nvidia.dali": {"pipeline.data"}, "ray.train": {"pipeline.worker"}, "mlflow": {"pipeline.tracking"}}


def modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


def imports(name: str, path: Path) -> set[str]:
    """Every dotted name `name` imports (absolute; relative imports resolved)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{base}".rstrip(".")
            out |= {f"{base}.{a.name}" for a in node.names} | {base}
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__" and node.args \
                and isinstance(node.args[0], ast.Constant):
            out.add(node.args[0].value)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()

    def ours(dotted: str) -> str | None:
        while dotted and dotted not in mods:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    return {m: {t for t in map(ours, imports(m, p)) if t and t != m} for m, p in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_the_circles_this_house_once_had():
    had = {"data_prep.shard": {"data_prep.foreign"}, "data_prep.foreign": {"data_prep.shard", "data_prep.store"},
           "pipeline.bench": {"pipeline.gpubench"}, "pipeline.gpubench": {"pipeline.bench", "pipeline.data"},
           "data_prep.store": set(), "pipeline.data": set()}
    assert cycles(had) == [["data_prep.foreign", "data_prep.shard"], ["pipeline.bench", "pipeline.gpubench"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_circle():
    edges = graph()
    assert len(edges) > 40 and edges["pipeline.worker"], "the graph reader found too little"
    assert cycles(edges) == []


def test_no_import_from_a_package_or_layer_above():
    rank = {p: i for i, p in enumerate(PACKAGES)}
    upward = [(m, t) for m, ts in graph().items() for t in ts if rank[t.split(".")[0]] > rank[m.split(".")[0]]]
    assert upward == [], "a package imports from one above it"
    command = [(m, t) for m, ts in graph().items() for t in ts
               if t.startswith(COMMANDS) and not m.startswith(COMMANDS)]
    assert command == [], "a library module imports the command layer"


def test_each_framework_is_imported_by_its_owner_only():
    strays = sorted({(m, lib) for m, p in modules().items() for name in imports(m, p)
                    for lib, owners in OWNERS.items()
                     if (name == lib or name.startswith(lib + ".")) and m not in owners})
    assert strays == []
