"""The layer order holds: import-linter's contracts (pyproject.toml) are kept, no package-level
import cycle exists, and ``planning`` imports neither autoliver nor torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def package_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "planning":
        return "planning"
    if parts[0] == "autoliver" and len(parts) > 1:
        return ".".join(parts[:2])
    return None


def imported_modules(path: Path, own: list[str]) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = own[: len(own) - node.level] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out.add(module)
            out |= {f"{module}.{a.name}" for a in node.names}
    return out


def _exists(package: str) -> bool:
    """A package folder or a top-level module (``autoliver.cli``); not a name like ``autoliver.__version__``."""
    path = ROOT / Path(*package.split("."))
    return path.is_dir() or path.with_suffix(".py").is_file()


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for top in ("autoliver", "planning"):
        for path in (ROOT / top).rglob("*.py"):
            own = list(path.relative_to(ROOT).with_suffix("").parts)
            src = package_of(".".join(own))
            if src is None:
                continue
            for module in imported_modules(path, own):
                dst = package_of(module)
                if dst is not None and dst != src and _exists(dst):
                    graph.setdefault(src, set()).add(dst)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one package (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_package_level_import_cycle():
    graph = package_graph()
    assert "autoliver.infer" in graph and "autoliver.core" in graph["autoliver.infer"]  # the graph is really read
    assert cycles(graph) == []


def test_import_linter_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_planning_imports_neither_autoliver_nor_torch():
    code = ("import sys, planning.planner, planning.fingerprint, planning.memory, planning.plans, planning.topology, planning.crop; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('autoliver', 'torch')); print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
