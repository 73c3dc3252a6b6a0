"""docs/configuration.md is generated from the schema and must match it."""

from __future__ import annotations

import subprocess
import sys

from lepton_ray.config import docs as config_docs
from tests.conftest import ROOT

DOCS = ROOT / "docs" / "configuration.md"


def test_committed_reference_matches_the_schema():
    problem = config_docs.check_file(DOCS)
    assert problem is None, f"{problem}\n(run `python -m lepton_ray.config.docs --write`)"


def test_reference_documents_nested_keys_types_defaults_and_constraints():
    text = config_docs.render_reference()
    rows = {
        line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| `")
    }
    for key in ("train.lr", "data.split.validation", "serve.port", "peft.lora.r", "tune.space"):
        assert f"`{key}`" in rows, f"{key} missing from the reference"
    assert "> 0.0; < 1.0" in rows["`train.lr`"] and "`0.0005`" in rows["`train.lr`"]
    assert "≥ 1; ≤ 65535" in rows["`serve.port`"] and "`8000`" in rows["`serve.port`"]
    assert "one of `auto`, `csv`, `tsv`, `jsonl`, `parquet`" in rows["`data.format`"]
    assert "**required**" in rows["`name`"] and "`data.hf.name`" in rows
    # dict[str, SearchParam] gets a table of its own for the items.
    assert "`tune.space.<key>.type`" in rows
    assert "val_macro_f1" in rows["`tune.metric`"]


def test_check_fails_with_the_command_to_run(tmp_path, capsys):
    stale = tmp_path / "configuration.md"
    stale.write_text(config_docs.render_reference().replace("train.lr", "train.lrr"))
    assert config_docs.main(["--check", "--path", str(stale)]) == 1
    err = capsys.readouterr().err
    assert "out of date" in err and "python -m lepton_ray.config.docs --write" in err
    assert config_docs.main(["--check", "--path", str(tmp_path / "missing.md")]) == 1

    assert config_docs.main(["--write", "--path", str(stale)]) == 0
    assert config_docs.main(["--check", "--path", str(stale)]) == 0


def test_generator_imports_neither_torch_nor_ray():
    code = (
        "import sys, lepton_ray.config.docs as d; d.render_reference(); "
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'transformers'}); "
        "print(','.join(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""
