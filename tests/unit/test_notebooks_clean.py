"""The notebooks as stored: no outputs, parameters first, and no logic of their own.

Cheap checks on the files (no kernel): outputs are stripped before they are committed, each
notebook opens with a markdown cell and a ``parameters`` cell (``CONFIG``, ``OVERRIDES``),
and code cells only call ``lepton_ray``: no function or class is defined in a notebook
(missing logic belongs in ``lepton_ray/explore.py``, with tests).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = {"01_quickstart.ipynb", "02_sweep_register_serve.ipynb"}


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _code(cell: dict) -> str:
    source = cell["source"]
    return "".join(source) if isinstance(source, list) else source


def _python(cell: dict) -> ast.Module:
    """A code cell parsed as Python, its IPython magics (``%...``, ``!...``) left out."""
    lines = [
        "" if line.lstrip().startswith(("%", "!")) else line for line in _code(cell).splitlines()
    ]
    return ast.parse("\n".join(lines))


def test_the_notebooks_are_there():
    assert {p.name for p in NOTEBOOKS} >= EXPECTED
    assert not (ROOT / "notebooks" / "quickstart.ipynb").exists(), "replaced by 01_quickstart"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_outputs(path):
    nb = _load(path)
    assert nb["nbformat"] == 4
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        assert cell.get("outputs") == [], f"{path.name} cell {i} has outputs: clear them"
        assert cell.get("execution_count") is None, f"{path.name} cell {i} has an execution count"
        assert "execution" not in cell.get("metadata", {}), f"{path.name} cell {i}: timing metadata"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_valid_nbformat(path):
    nbformat = pytest.importorskip("nbformat")
    nbformat.validate(nbformat.read(path, as_version=4))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_markdown_then_parameters(path):
    cells = _load(path)["cells"]
    assert cells[0]["cell_type"] == "markdown"
    assert cells[1]["cell_type"] == "code"
    assert "parameters" in cells[1].get("metadata", {}).get("tags", [])
    assigned = {
        target.id
        for node in _python(cells[1]).body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    assert {"CONFIG", "OVERRIDES"} <= assigned
    later = [c for c in cells[2:] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert not later, "one parameters cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_logic_of_their_own(path):
    for i, cell in enumerate(_load(path)["cells"]):
        if cell["cell_type"] != "code":
            continue
        for node in ast.walk(_python(cell)):
            assert not isinstance(
                node,
                ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda,
            ), f"{path.name} cell {i} defines {type(node).__name__}: move it to lepton_ray"
