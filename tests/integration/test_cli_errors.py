"""Bad input: one clear line, a non-zero exit, no traceback, nothing half-written."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from lepton_ray.cli import app
from tests.conftest import smoke_config, write_yaml

runner = CliRunner()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lepton_ray.cli", *args], capture_output=True, text=True
    )


def assert_one_line_error(proc, *needles: str, code: int = 2):
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0]


def test_help_answers_without_heavy_imports():
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from lepton_ray.cli import app; "
            "print(any(m in sys.modules for m in ('torch', 'ray', 'transformers', 'mlflow')))",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.stdout.strip() == "False"
    assert cli("--help").returncode == 0


def test_missing_config(tmp_path):
    assert_one_line_error(cli("validate", str(tmp_path / "nope.yaml")), "config file not found")


def test_malformed_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [oops\n")
    assert_one_line_error(cli("train", str(bad)), str(bad), "malformed YAML")


def test_a_binary_config_is_not_a_text_yaml_file(tmp_path):
    binary = tmp_path / "picture.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    assert_one_line_error(cli("validate", str(binary)), str(binary), "not a text YAML file")


def test_unknown_key_in_file_and_override(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("review,sentiment\na,x\nb,y\n")
    path = write_yaml(tmp_path / "c.yaml", smoke_config(tmp_path, data, train={"lr_rate": 1}))
    assert_one_line_error(
        cli("validate", str(path)), str(path), "unknown key 'train.lr_rate'", "did you mean"
    )
    good = write_yaml(tmp_path / "g.yaml", smoke_config(tmp_path, data))
    assert_one_line_error(
        cli("run", str(good), "--set", "scaling.num_worker=3"),
        "scaling.num_worker",
        "did you mean 'scaling.num_workers'",
    )


def test_missing_data_file(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", smoke_config(tmp_path, tmp_path / "absent.csv"))
    assert_one_line_error(cli("preprocess", str(path)), "data.path", "not found")


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize(
    "content, needle",
    [
        ("text,sentiment\nhello,x\nbye,y\n", "data.text_column 'review' is not a column"),
        ("review,mood\nhello,x\nbye,y\n", "data.label_column 'sentiment' is not a column"),
        ("review,sentiment\nhello,x\nbye,x\nmore,x\n", "has a single class ('x')"),
        ('review,sentiment\nhello,x\n"broken,y,extra\n', "data.path"),
    ],
    ids=["no-text-column", "no-label-column", "single-class", "malformed-row"],
)
def test_bad_data_fails_cleanly_and_leaves_nothing(tmp_path, content, needle):
    _fails_cleanly(tmp_path, content, needle)


def _all_train_rows(n: int) -> str:
    """A CSV whose every text hashes into the train split (smoke config: seed 42, 0.2/0.2)."""
    from lepton_ray.data.split import split_of, text_key

    texts = (f"review number {i}" for i in range(10_000))
    picked = [t for t in texts if split_of(text_key(t, 42), 0.2, 0.2) == "train"][:n]
    return "review,sentiment\n" + "".join(f"{t},{'xy'[i % 2]}\n" for i, t in enumerate(picked))


@pytest.mark.usefixtures("ray_session")
def test_an_empty_validation_split_is_a_clear_error(tmp_path):
    _fails_cleanly(tmp_path, _all_train_rows(6), "the validation split is empty")


def _fails_cleanly(tmp_path, content: str, needle: str) -> None:
    data = tmp_path / "d.csv"
    data.write_text(content)
    raw = smoke_config(tmp_path, data)
    path = write_yaml(tmp_path / "c.yaml", raw)
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert "Traceback" not in result.output
    run_dir = tmp_path / "storage" / "smoke"
    assert not (run_dir / "data").exists()
    assert not list(run_dir.glob(".data.tmp-*"))
    # The pipeline's MLflow run is only made after the data is good: no run to mislead.
    assert not (tmp_path / "mlruns" / "mlflow.db").exists() or _no_runs(tmp_path)


def _no_runs(tmp_path) -> bool:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    return all(not c.search_runs([e.experiment_id]) for e in c.search_experiments())
