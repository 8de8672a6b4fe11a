"""No import circle among the repository's own modules (mixture_core, nodes, training): read from
the source, imports inside functions included (a lazy import that closes a circle is still one)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("mixture_core", "nodes", "training")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The repository modules `path` imports (`from .x import y` as .x, or .x.y where y is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                # Above the top-level packages: the pack's own relative imports (..mixture_core.x from nodes/).
                base = ".".join([*anchor, base] if anchor else [base]).strip(".")
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the path, 2 done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def import_graph() -> dict[str, set[str]]:
    files = [f for package in PACKAGES for f in sorted((REPO / package).rglob("*.py"))]
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules) for f in files}


def test_no_import_circle():
    graph = import_graph()
    assert "training.sampling" in graph["training.loop"]  # the graph sees the imports
    assert "mixture_core.mole" in graph["nodes.mole_nodes"]  # relative imports out of nodes/ too
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_a_circle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_core_package_imports_every_module():
    """`import mixture_core` loads each of its modules (what the pack's __init__.py aliases)."""
    expected = {module_name(f) for f in (REPO / "mixture_core").rglob("*.py")}
    script = "import sys, mixture_core; print(*sorted(m for m in sys.modules if m.split('.')[0] == 'mixture_core'))"
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    missing = expected - set(proc.stdout.split())
    assert not missing, f"add them to mixture_core/__init__.py: {sorted(missing)}"
