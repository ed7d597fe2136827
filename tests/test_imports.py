"""The import graph of collapselab, walked from the source (no imports executed).

Rules (docs/architecture.md): no import cycles between files; no file imports another file's
``_private`` names; nothing outside ``collapselab.fast`` (the optional CPU accelerator) imports
it, except cli/api/config, which expose the switch; theory.py imports nothing from the package.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "collapselab"
# Files allowed to import collapselab.fast: they expose the switch (score.train_backend).
FAST_GATES = {"collapselab.cli", "collapselab.api", "collapselab.config"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(mod: str, node: ast.ImportFrom) -> str:
    """The absolute module of a ``from X import`` inside module ``mod``."""
    if node.level == 0:
        return node.module or ""
    is_pkg = False
    base = mod.split(".")
    # a package's __init__ is named after the package: relative imports start there
    if (ROOT.parent / Path(*base) / "__init__.py").exists():
        is_pkg = True
    pkg = base if is_pkg else base[:-1]
    pkg = pkg[: len(pkg) - (node.level - 1)]
    return ".".join(pkg + ([node.module] if node.module else []))


def _graph():
    """{module: [(imported module, imported names, line)]} for every file of the package."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    edges: dict[str, list[tuple[str, list[str], int]]] = {}
    for mod, path in files.items():
        out = []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(mod, node)
                names = []
                for a in node.names:  # ``from . import loop`` imports a module
                    if f"{target}.{a.name}" in files:
                        out.append((f"{target}.{a.name}", [], node.lineno))
                    else:
                        names.append(a.name)
                if names:
                    out.append((target, names, node.lineno))
            elif isinstance(node, ast.Import):
                out += [(a.name, [], node.lineno) for a in node.names]
        edges[mod] = [(t, n, ln) for t, n, ln in out
                      if t == "collapselab" or t.startswith("collapselab.")]
    return files, edges


FILES, EDGES = _graph()


def test_graph_sees_the_package():
    assert "collapselab.theory" in FILES and "collapselab.scores.training" in FILES
    assert any(t == "collapselab.scores.mlp" for t, _, _ in EDGES["collapselab.scores.training"])


def test_no_import_cycles():
    # Every import counts, deferred ones inside functions too: a cycle is a cycle of files.
    graph = {m: {t for t, _, _ in es if t in FILES and t != m} for m, es in EDGES.items()}
    for pkg in [m for m in FILES if (ROOT.parent / Path(*m.split(".")) / "__init__.py").exists()]:
        graph[pkg] = set()  # a package's __init__ re-exporting its modules is not a cycle
    seen: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m):
        seen[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if seen.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in seen:
                visit(t)
        stack.pop()
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_private_names_across_files():
    bad = [f"{m}:{ln} imports {t}.{n}" for m, es in EDGES.items() for t, names, ln in es
           for n in names if n.startswith("_") and not n.startswith("__") and t != m]
    assert not bad, "\n".join(bad)


def test_only_the_switch_imports_fast():
    bad = [f"{m}:{ln} imports {t}" for m, es in EDGES.items() for t, _, ln in es
           if (t == "collapselab.fast" or t.startswith("collapselab.fast."))
           and not (m == "collapselab.fast" or m.startswith("collapselab.fast."))
           and m not in FAST_GATES]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("mod,allowed", [
    ("collapselab.theory", set()),  # the theory layer is pure
    # closed forms: numbers and Estimate
    ("collapselab.measure.gaussians", {"collapselab.measure.estimate"}),
    # shared by the drivers
    ("collapselab.engine.chains", {"collapselab.config", "collapselab.engine.store",
                                   "collapselab.engine.loop"}),
    # the test hooks: plain data and one exception type
    ("collapselab.engine.hooks", {"collapselab.scores.training"}),
])
def test_low_modules_import_only_what_they_may(mod, allowed):
    assert mod in FILES
    got = {t for t, _, _ in EDGES[mod]}
    assert got <= allowed, f"{mod} imports {sorted(got - allowed)}"


def test_theory_imports_only_the_standard_library_and_numpy():
    tree = ast.parse(FILES["collapselab.theory"].read_text(encoding="utf-8"))
    mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    mods |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    # the standard library and numpy only: nothing of the package, nothing heavy
    assert {m.split(".")[0] for m in mods} <= set(sys.stdlib_module_names) | {"numpy"}, mods


# The house's tiers (docs/architecture.md): the science core (flat modules), then the models and
# the measurements, then the engine, experiments and report, then the entry points. A module
# imports its own tier or lower ones; collapselab.fast (the opt-in accelerator) stands apart.
CORE = {"config", "errors", "targets", "processes", "samplers", "policies", "theory", "verdicts",
        "datasets", "environment", "files"}
TOP = {"cli", "api", "monitor", ""}


def _tier(mod: str) -> int | None:
    parts = mod.split(".")[1:]
    head = parts[0] if parts else ""
    if head == "fast":
        return None
    if head in TOP:
        return 3
    if head in ("engine", "experiments", "report"):
        return 2
    if head in ("scores", "measure"):
        return 1
    assert head in CORE, f"{mod}: a module outside the house's tiers (add it to a tier)"
    return 0


def test_imports_go_one_way():
    bad = []
    for m, es in EDGES.items():
        for t, _, ln in es:
            tm, tt = _tier(m), _tier(t)
            if tm is None or tt is None or t not in FILES:
                continue
            if tt > tm:
                bad.append(f"{m}:{ln} (tier {tm}) imports {t} (tier {tt})")
    assert not bad, "\n".join(bad)


def test_the_engine_never_imports_the_report():
    bad = [f"{m}:{ln} imports {t}" for m, es in EDGES.items() for t, _, ln in es
           if m.startswith("collapselab.engine.") and t.startswith("collapselab.report")]
    assert not bad, "\n".join(bad)
