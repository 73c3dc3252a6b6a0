"""The CLI's terminal output: stage lines on the terminal, everything else in the log file.

The stage is faked (no Ray): it prints what Ray, the libraries, C code and child processes
print, so the redirection of fds 1 and 2 is checked in a real process.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lepton_ray.cli import app
from lepton_ray.data.report import summary_table
from tests.conftest import smoke_config, write_yaml

STEP = "[train] epoch 1/1 step 4/4 loss 0.5000 lr 1.00e-03 9.0 samples/s"
FAKE_STAGE = textwrap.dedent(
    f"""
    import atexit, logging, os, subprocess, sys, warnings
    import lepton_ray.pipeline as pipeline

    def fake(cfg, log=print, force=False):
        atexit.register(lambda: print("shutdown noise from atexit"))  # as Ray's shutdown
        logging.getLogger("ray").addHandler(logging.StreamHandler())
        log("[data] read 3 rows")
        logging.getLogger("ray").warning("INFO worker.py -- Started a local Ray instance.")
        print("\\x1b[36m(RayTrainWorker pid=7)\\x1b[0m {STEP}")
        print("(RayTrainWorker pid=7) [train] epoch 1/1 done: val_accuracy 0.5")
        warnings.warn("old thing is deprecated", FutureWarning)
        sys.stderr.write("Downloading artifacts:  50%|#   |\\r")
        os.write(1, b"C-level stdout\\n")
        os.write(2, b"C-level stderr\\n")
        subprocess.run(["{sys.executable}", "-c", "print('child output')"], check=True)
        if os.environ.get("FAKE_FAIL"):
            raise RuntimeError("boom")
        return {{"rows_read": 3, "dropped": {{}}, "splits": {{"train": 3}}}}

    pipeline.run_preprocess_stage = fake
    from lepton_ray.cli import main
    sys.argv = ["lepton-ray", *sys.argv[1:]]
    main()
    """
)
NOISE = [
    "Started a local Ray instance",
    "old thing is deprecated",
    "C-level stdout",
    "C-level stderr",
    "child output",
    "shutdown noise from atexit",
    "Downloading artifacts",
]


@pytest.fixture()
def config(tmp_path) -> Path:
    data = tmp_path / "d.csv"
    data.write_text("review,sentiment\na,x\nb,y\n")
    return write_yaml(tmp_path / "c.yaml", smoke_config(tmp_path, data))


def lepton(tmp_path, *args, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", FAKE_STAGE, *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, **env},
        timeout=120,
    )


def log_file(tmp_path, stdout: str) -> Path:
    first = stdout.splitlines()[0]
    assert first.startswith("log: outputs/smoke/logs/preprocess-") and first.endswith(".log")
    return tmp_path / first.removeprefix("log: ")


def test_default_shows_stage_lines_only_and_logs_the_rest(tmp_path, config):
    proc = lepton(tmp_path, "preprocess", str(config))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    table = summary_table({"rows_read": 3, "dropped": {}, "splits": {"train": 3}})
    assert lines[1:] == [
        "[data] read 3 rows",
        "[train] epoch 1/1 [####################] 4/4 steps  loss 0.5000  9 samples/s",
        "[train] epoch 1/1 done: val_accuracy 0.5",
        *table.splitlines(),
    ]
    log = log_file(tmp_path, proc.stdout).read_text()
    for needle in NOISE + ["[data] read 3 rows", f"(RayTrainWorker pid=7) {STEP}"]:
        assert needle in log, needle


def test_an_error_is_one_stderr_line_and_the_log_holds_the_traceback(tmp_path, config):
    proc = lepton(tmp_path, "preprocess", str(config), FAKE_FAIL="1")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "error: RuntimeError: boom (set LEPTON_DEBUG=1 for the traceback)"
    ]
    path = log_file(tmp_path, proc.stdout)
    assert proc.stdout.splitlines()[-1] == f"log: {path.relative_to(tmp_path)}"
    log = path.read_text()
    assert "Traceback" in log and "RuntimeError: boom" in log and "C-level stderr" in log


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_shows_everything(tmp_path, config, where):
    args = (
        ["-v", "preprocess", str(config)]
        if where == "before"
        else ["preprocess", "-v", str(config)]
    )
    proc = lepton(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    both = proc.stdout + proc.stderr
    for needle in NOISE:
        assert needle in both, needle
    assert f"(RayTrainWorker pid=7)\x1b[0m {STEP}" in proc.stdout  # as printed, no bar
    assert "[data] read 3 rows" in log_file(tmp_path, proc.stdout).read_text()


def test_cli_runner_still_captures_the_stage_lines(tmp_path, config, monkeypatch):
    import lepton_ray.pipeline as pipeline

    def fake(cfg, log=print, force=False):
        log("[data] read 3 rows")
        print("2025 INFO worker.py -- Started a local Ray instance.")
        print(f"(RayTrainWorker pid=7) {STEP}")
        return {"rows_read": 3, "dropped": {}, "splits": {}}

    monkeypatch.setattr(pipeline, "run_preprocess_stage", fake)
    monkeypatch.chdir(tmp_path)
    before = sys.stdout
    result = CliRunner().invoke(app, ["preprocess", str(config)])
    assert result.exit_code == 0, result.output
    assert sys.stdout is before
    assert "[data] read 3 rows" in result.output
    assert "4/4 steps" in result.output
    assert "Started a local Ray instance" not in result.output
    assert result.output.startswith("log: outputs/smoke/logs/preprocess-")
