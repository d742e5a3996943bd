"""The project's import drawing has no cycle: a module never imports (directly or through others) a module that
imports it back, lazy imports inside functions included. A cycle is what hides a module split by length: each half
needs the other, so neither can be read, tested or imported on its own.

The imports are read from the source (ast), so this runs without torch, Slicer or any optional dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Where each tree's modules are importable from: the repository root for the packages, the module folder for the
# Slicer module (Slicer puts it on sys.path, so its packages are MiniGPTPancreasLib, MiniGPTPancreasGui).
SOURCE_TREES = {"SlicerMiniGPTPancreas": ROOT, "backend": ROOT, "training": ROOT,
                "MiniGPTPancreasModule": ROOT / "MiniGPTPancreasModule"}


def module_name(path: Path, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    modules = {}
    for tree, base in SOURCE_TREES.items():
        for path in sorted((ROOT / tree).rglob("*.py")):
            if "demo_model" not in path.parts:
                modules[module_name(path, base)] = path
    return modules


def imported_by(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules `path` imports anywhere in its body; `from pkg import sub` counts as importing pkg.sub."""
    is_package = path.name == "__init__.py"
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in modules else base)
    return {target for target in targets if target in modules and target != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_through_a_lazy_import(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from pkg.b import thing\n")
    (tmp_path / "pkg" / "b.py").write_text("def thing():\n    from . import a\n")
    modules = {module_name(path, tmp_path): path for path in (tmp_path / "pkg").glob("*.py")}
    graph = {name: imported_by(name, path, modules) for name, path in modules.items()}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]


def test_the_project_imports_have_no_cycle():
    modules = project_modules()
    assert {"SlicerMiniGPTPancreas.protocol", "backend.service.app", "training.evaluate"} <= set(modules)
    graph = {name: imported_by(name, path, modules) for name, path in modules.items()}
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"
