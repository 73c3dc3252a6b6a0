"""The package's layout rules, read from the source: module size, import cycles, the direction
of imports between stages, and the task axis living in ``lepton_ray/tasks/`` only."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "lepton_ray"
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.with_suffix("").relative_to(PACKAGE.parent).parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(path: Path) -> set[str]:
    """lepton_ray modules ``path`` imports, lazily or not; ``if TYPE_CHECKING:`` blocks aside."""
    tree = ast.parse(path.read_text())
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            typing_only |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {_resolve(a.name) for a in node.names if a.name.startswith("lepton_ray")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lepton_ray"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in MODULES else _resolve(node.module))
    return found - {"lepton_ray"}


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def test_no_module_is_over_the_limit():
    long = {n: len(p.read_text().splitlines()) for n, p in MODULES.items()}
    assert {n: k for n, k in long.items() if k > MAX_LINES} == {}


def test_there_is_no_import_cycle():
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(GRAPH.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def _stage(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


@pytest.mark.parametrize(
    "stage, forbidden",
    [
        ("data", {"train", "tune", "registry", "compress", "serve", "pipeline", "cli"}),
        ("tasks", {"data", "train", "tune", "registry", "compress", "serve", "pipeline", "cli"}),
        ("train", {"tune", "registry", "compress", "serve", "pipeline", "cli"}),
        ("serve", {"train", "tune", "cli"}),
        ("tracking", {"registry", "compress", "serve", "train", "tune", "cli"}),
        ("config", {"data", "train", "tune", "registry", "compress", "serve", "cli"}),
        ("compress", {"train", "tune", "registry", "serve", "pipeline", "cli"}),
    ],
)
def test_imports_follow_the_flow(stage, forbidden):
    against = {
        (module, dep)
        for module, deps in GRAPH.items()
        if _stage(module) == stage
        for dep in deps
        if _stage(dep) in forbidden
    }
    assert against == set()


def test_nothing_imports_the_cli():
    assert {m for m, deps in GRAPH.items() if _stage(m) != "cli" and "lepton_ray.cli" in deps} - {
        "lepton_ray.__main__"
    } == set()


def test_the_training_loop_runs_without_ray():
    assert not re.search(
        r"^\s*(import|from) ray\b", (PACKAGE / "train" / "loop.py").read_text(), re.M
    )


@pytest.mark.parametrize(
    "pattern",
    [
        r"ForSequenceClassification",
        r"num_labels",
        r"label_id",
        r"SEQ_CLS",
        r"task\s*[!=]=\s*['\"]",  # a branch on one task's name
    ],
)
def test_only_tasks_name_a_task(pattern):
    named = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.relative_to(PACKAGE).parts[0] != "tasks" and re.search(pattern, path.read_text())
    )
    assert named == []
