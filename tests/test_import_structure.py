"""The package's import structure: the ground (ops, models, probes, utils) never imports a wing, and the two modules
that once imported each other (the eval runner and the eval's memory plan) no longer do. Imports inside functions
count too: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import radistill

ROOT = Path(radistill.__file__).parent
GROUND = ("ops", "models", "probes", "utils")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every radistill module or package ``path`` imports, anywhere in the file (absolute and relative imports)."""
    found: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in found if name == "radistill" or name.startswith("radistill.")}


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def test_the_ground_imports_no_wing():
    offenders = []
    for name, targets in import_graph().items():
        area = name.split(".")[1] if name.count(".") else ""
        if area in GROUND:
            offenders += [f"{name} -> {t}" for t in sorted(targets) if t.split(".")[1] not in GROUND]
    assert not offenders, offenders


def test_eval_runner_and_memplan_eval_do_not_import_each_other():
    graph = import_graph()
    both = ("radistill.eval.runner", "radistill.memplan.eval")
    assert not (both[1] in graph[both[0]] and both[0] in graph[both[1]])
    # the shared piece lives in radistill.eval.tasks, which needs neither
    assert not set(both) & graph["radistill.eval.tasks"]


def test_the_import_graph_sees_lazy_imports():
    """The checks above would pass vacuously if function-level imports were missed."""
    graph = import_graph()
    assert "radistill.memplan.eval" in graph["radistill.eval.runner"]  # imported inside fit_eval
    assert "radistill.eval.tasks" in graph["radistill.memplan.eval"]
