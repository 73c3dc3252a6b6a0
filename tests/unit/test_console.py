"""The terminal filter: which lines reach the terminal, the progress bar, the log file."""

import contextlib
import io
import logging
import sys
import types

import pytest

from lepton_ray import console as con
from lepton_ray.console import (
    Console,
    TerminalView,
    TrainStep,
    clean_line,
    display_path,
    log_path,
    parse_train_step,
    render_bar,
    stage_line,
    unique_path,
)
from lepton_ray.tasks import get_task

STEP = "[train] epoch 1/2 step 24/50 loss 0.6123 lr 2.50e-04 112.4 samples/s"


# ------------------------------------------------------------------------- line filtering
@pytest.mark.parametrize(
    "raw, source, text",
    [
        ("(RayTrainWorker pid=1234) [train] go", "RayTrainWorker pid=1234", "[train] go"),
        (
            "(RayTrainWorker pid=77, ip=10.0.0.5) [train] go",
            "RayTrainWorker pid=77, ip=10.0.0.5",
            "[train] go",
        ),
        ("\x1b[36m(pid=9)\x1b[0m [tune] trial", "pid=9", "[tune] trial"),
        ("(MapBatches(tokenize) pid=5) [data] x", "MapBatches(tokenize) pid=5", "[data] x"),
        (
            "(HashAggregateReduce(key_columns=('a',), n=2) pid=8, ip=1.2.3.4) [data] y",
            "HashAggregateReduce(key_columns=('a',), n=2) pid=8, ip=1.2.3.4",
            "[data] y",
        ),
        ("(no pid here) [data] z", "", "(no pid here) [data] z"),
        ("(pid=1 unbalanced [data] z", "", "(pid=1 unbalanced [data] z"),
        (
            "(RayTrainWorker pid=3) [train] a [repeated 2x across cluster] (Ray deduplicates "
            "logs by default. Set RAY_DEDUP_LOGS=0 to disable log deduplication.)",
            "RayTrainWorker pid=3",
            "[train] a",
        ),
        ("[registry] m version 2", "", "[registry] m version 2"),
        ("  10%|#   |\r 100%|####|\r", "", " 100%|####|"),
        ("(autoscaler +2s) Tip: use `ray status`", "", "(autoscaler +2s) Tip: use `ray status`"),
    ],
)
def test_clean_line_strips_ray_prefix_colour_and_dedup_note(raw, source, text):
    assert clean_line(raw) == (source, text)


@pytest.mark.parametrize(
    "raw",
    [
        "2025-01-02 10:00:00,123\tINFO worker.py:1900 -- Started a local Ray instance.",
        "[2025-01-02 10:00:00,123 I 4321 4321] core_worker.cc:200: Constructing CoreWorker",
        "[W102 10:00:00.000000000 ProcessGroupGloo.cpp:515] Warning: unable to find address",
        "[rank0]: Traceback (most recent call last):",
        "(RayTrainWorker pid=1) /x/torch/nn/modules.py:12: FutureWarning: deprecated",
        "(TrainController pid=2) Attempting to start training worker group of size 2",
        "Downloading artifacts:  50%|#####     | 3/6 [00:00<00:00, 30.1it/s]",
        "| Trial name        | status     | loc              |",
        "[dataset]: Run `pip install tqdm` to enable progress reporting.",
        "[Train] nothing",
        "",
    ],
)
def test_library_and_ray_lines_are_not_stage_lines(raw):
    assert stage_line(raw) is None


@pytest.mark.parametrize("tag", sorted(con.STAGE_TAGS))
def test_every_stage_tag_passes_with_or_without_prefix(tag):
    assert stage_line(f"[{tag}] hello") == ("", f"[{tag}] hello")
    assert stage_line(f"\x1b[36m(Actor pid=42)\x1b[0m [{tag}] hello") == (
        "Actor pid=42",
        f"[{tag}] hello",
    )


# ------------------------------------------------------------------------- progress bar
def test_parse_and_render_a_step_line():
    step = parse_train_step(STEP)
    assert step == TrainStep(epoch=1, epochs=2, step=24, steps=50, loss=0.6123, rate=112.4)
    assert render_bar(step, width=10) == (
        "[train] epoch 1/2 [#####-----] 24/50 steps  loss 0.6123  112 samples/s"
    )
    full = render_bar(TrainStep(2, 2, 50, 50, 0.1, 3.0), width=4)
    assert "[####] 50/50 steps" in full
    assert parse_train_step("[train] epoch 1/2 done: train_loss 0.6 val_loss 0.5") is None
    assert parse_train_step("[train] 2 workers x 2 epochs, 100 training rows") is None


def test_the_training_loop_prints_lines_the_bar_understands():
    """The format is train/loop.py's: run it on a toy model and parse what it logs."""
    torch = pytest.importorskip("torch")
    import pandas as pd

    from lepton_ray.tasks.classification_eval import collate
    from lepton_ray.train.batching import TokenRows
    from lepton_ray.train.loop import LoopSettings, LoopState, run_training
    from lepton_ray.train.precision import Precision

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 2)

        def forward(self, input_ids, attention_mask, labels=None):
            logits = self.emb(input_ids).mean(dim=1)
            loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
            return types.SimpleNamespace(loss=loss, logits=logits)

    frame = pd.DataFrame(
        {
            "text": [f"t{i}" for i in range(40)],
            "input_ids": [[1 + i % 40, 2, 3][: 1 + i % 3] for i in range(40)],
            "label_id": [i % 2 for i in range(40)],
        }
    )
    rows = TokenRows.from_frames([frame], "label_id")
    model = Toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    lines: list[str] = []
    run_training(
        model,
        opt,
        sched,
        rows,
        pad_id=0,
        eval_batches=lambda: [collate(rows.sequences(range(8)), rows.targets[:8], 0)],
        task=get_task("sequence_classification"),
        labels=["0", "1"],
        settings=LoopSettings(epochs=2, batch_size=4, log_every_steps=2),
        state=LoopState(),
        device=torch.device("cpu"),
        precision=Precision("fp32", "cpu", "test"),
        log=lines.append,
    )
    steps = [parse_train_step(line) for line in lines]
    steps = [step for step in steps if step is not None]
    assert len(steps) == 10, lines
    assert [(s.epoch, s.step) for s in steps][:3] == [(1, 2), (1, 4), (1, 6)]
    assert steps[-1].epochs == 2 and steps[-1].steps == 10 and steps[-1].rate > 0
    # The evaluation summaries are plain stage lines, not bars.
    done = [line for line in lines if "val_loss" in line]
    assert len(done) == 2 and all(stage_line(line) for line in done)
    assert not any(parse_train_step(line) for line in done)


def _step(epoch, step, steps=8):
    return f"[train] epoch {epoch}/2 step {step}/{steps} loss 0.5000 lr 1.00e-03 10.0 samples/s"


def test_tty_view_redraws_one_line_and_keeps_its_last_state():
    out: list[str] = []
    view = TerminalView(out.append, tty=True, columns=lambda: 200)
    view.show("[train] 2 workers x 2 epochs")
    for s in (2, 4, 8):
        view.show(_step(1, s), source="w pid=1")
    view.show("[train] epoch 1/2 done: val_accuracy 0.5")
    view.end()
    text = "".join(out)
    lines = text.split("\n")
    assert lines[0] == "[train] 2 workers x 2 epochs"
    assert lines[1].count("\r\x1b[K") == 3 and lines[1].endswith(
        "8/8 steps  loss 0.5000  10 samples/s"
    )
    assert lines[2] == "[train] epoch 1/2 done: val_accuracy 0.5"
    assert text.endswith("done: val_accuracy 0.5\n")  # end() adds nothing when no bar is open


def test_tty_view_starts_a_new_line_for_another_worker_and_fits_the_width():
    out: list[str] = []
    view = TerminalView(out.append, tty=True, columns=lambda: 40)
    view.show(_step(1, 2), source="a pid=1")
    view.show(_step(1, 2), source="b pid=2")
    view.end()
    bars = "".join(out).split("\n")
    assert len(bars) == 3 and bars[2] == ""
    assert all(len(b.replace("\r\x1b[K", "")) <= 39 for b in bars)
    unknown: list[str] = []
    view = TerminalView(unknown.append, tty=True, columns=lambda: 0)
    view.show(_step(1, 2))
    assert unknown == ["\r\x1b[K" + render_bar(parse_train_step(_step(1, 2)))]


def test_plain_view_prints_about_five_bars_an_epoch():
    out: list[str] = []
    view = TerminalView(out.append, tty=False)
    for epoch in (1, 2):
        for s in range(1, 9):
            view.show(_step(epoch, s), source="w")
        view.show(f"[train] epoch {epoch}/2 done: x")
    assert all(chunk.endswith("\n") and "\r" not in chunk for chunk in out)
    bars = [c for c in out if "steps" in c]
    assert [c.split("] ")[-1].split(" ")[0] for c in bars[:5]] == [
        "1/8",
        "2/8",
        "4/8",
        "6/8",
        "8/8",
    ]
    assert len(bars) == 10
    assert out[5] == "[train] epoch 1/2 done: x\n"


# ------------------------------------------------------------------------- log paths
def test_log_path_under_the_run_dir_or_outputs(tmp_path):
    now = 1_700_000_000.0
    stamp = __import__("time").strftime("%Y%m%d-%H%M%S", __import__("time").localtime(now))
    assert log_path("run", tmp_path / "outputs" / "exp", now) == (
        tmp_path / "outputs" / "exp" / "logs" / f"run-{stamp}.log"
    )
    assert str(log_path("cluster up", None, now)) == f"outputs/logs/cluster-up-{stamp}.log"
    first = tmp_path / "a.log"
    assert unique_path(first) == first
    first.write_text("")
    assert unique_path(first) == tmp_path / "a-2.log"
    assert display_path(tmp_path / "x" / "y.log", cwd=tmp_path) == "x/y.log"
    assert display_path("/elsewhere/y.log", cwd=tmp_path) == "/elsewhere/y.log"


# ------------------------------------------------------------------------- the session
@pytest.fixture()
def streams():
    """Fresh sys.stdout/sys.stderr for the test body (pytest re-installs its own capture
    between set-up and call, so a fixture cannot simply monkeypatch them)."""

    @contextlib.contextmanager
    def swap():
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err = io.StringIO(), io.StringIO()
        try:
            yield out, err
        finally:
            sys.stdout, sys.stderr = saved

    return swap


def test_console_shows_stage_lines_and_logs_everything(tmp_path, streams):
    with streams() as (out, err):
        c = Console(tmp_path / "logs" / "run.log", redirect_fds=False).start()
        assert sys.stdout is not out and not sys.stdout.isatty()
        c.say("log: here")
        print("2025-01-02 INFO worker.py:1 -- Started a local Ray instance.")
        print("\x1b[36m(RayTrainWorker pid=1)\x1b[0m [train] worker line", file=sys.stderr)
        sys.stdout.write("(RayTrainWorker pid=1) " + _step(1, 8))
        sys.stdout.write("\n(pid=2) tqdm  50%|##  |\r(pid=2) tqdm 100%|####|\n")
        # A library's logger set up after the start (as Ray's is, at import) writes here.
        logger = logging.getLogger("lepton-test-console")
        handler = logging.StreamHandler()
        logger.addHandler(handler)
        try:
            logger.warning("FutureWarning: torch thing is deprecated")
        finally:
            logger.removeHandler(handler)
        sys.stdout.write("unfinished [data] tail")
        c.say("== summary ==")
        c.finish()
        assert sys.stdout is out and sys.stderr is err
        assert out.getvalue().splitlines() == [
            "log: here",
            "[train] worker line",
            render_bar(parse_train_step(_step(1, 8))),
            "== summary ==",
        ]
        assert err.getvalue() == ""
        log = (tmp_path / "logs" / "run.log").read_text()
        for needle in (
            "Started a local Ray instance",
            "(RayTrainWorker pid=1) [train] worker line",
            "FutureWarning: torch thing is deprecated",
            "(pid=2) tqdm 100%|####|",
            "unfinished [data] tail",
            "== summary ==",
        ):
            assert needle in log
        assert "\x1b[" not in log and "tqdm  50%" not in log


def test_console_error_is_one_stderr_line_and_names_the_log(tmp_path, streams):
    with streams() as (out, err):
        c = Console(tmp_path / "e.log", redirect_fds=False).start()
        try:
            raise ValueError("deep cause")
        except ValueError as exc:
            c.log_exception(exc)
        c.error("error: it \x1b[36mbroke\x1b[39m")
        c.finish()
        assert err.getvalue() == "error: it broke\n"
        assert out.getvalue() == f"log: {display_path(tmp_path / 'e.log')}\n"
        log = (tmp_path / "e.log").read_text()
        assert "ValueError: deep cause" in log and "error: it broke" in log


def test_verbose_console_passes_everything_through_and_still_logs(tmp_path, streams):
    with streams() as (out, _):
        c = Console(tmp_path / "v.log", verbose=True, redirect_fds=False).start()
        print("2025 INFO noisy ray line")
        print("(RayTrainWorker pid=1) " + _step(1, 3))
        c.say("[ray] mine")
        c.finish()
        assert out.getvalue().splitlines() == [
            "2025 INFO noisy ray line",
            "(RayTrainWorker pid=1) " + _step(1, 3),
            "[ray] mine",
        ]
        assert "noisy ray line" in (tmp_path / "v.log").read_text()


def test_module_api_starts_once_and_falls_back_to_print(tmp_path, streams, monkeypatch):
    with streams() as (out, err):
        monkeypatch.chdir(tmp_path)
        con.say("before")
        c = con.start("train", tmp_path / "outputs" / "exp", redirect_fds=False)
        assert con.start("train", tmp_path / "other", redirect_fds=False) is c
        con.say("[train] inside")
        con.finish()
        assert con.active() is None
        con.error("error: after")
        lines = out.getvalue().splitlines()
        assert lines[0] == "before"
        assert lines[1].startswith("log: outputs/exp/logs/train-") and lines[1].endswith(".log")
        assert lines[2:] == ["[train] inside"]
        assert err.getvalue() == "error: after\n"
