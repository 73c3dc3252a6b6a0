"""``run_batch_predict``: a registered model over a whole dataset, offline, with Ray Data.

- The input is read as the data stage reads ``data.path`` (``lepton_ray.data.sources``: the
  same formats, ``header``/``column_names``, ``text_column`` joined by ``text_join``, and
  ``on_bad_row``); the label column is optional and kept as ``label_true``.
- Every text goes through the task's ``predict`` (``lepton_ray.tasks``) in a Ray Data actor pool (the
  model loaded once per actor), so it is cleaned and tokenized as in training and gets the
  answer the Serve endpoint gives.
- The rows reach the driver in input order (``preserve_order``), where each gets its id
  (file and row number) and is written to one Parquet, CSV or JSONL file, under a temporary
  name beside it until the last row is in.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lepton_ray.config import ExperimentConfig
from lepton_ray.errors import DataError, StageError

OUTPUT_FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl"}
BATCH_SIZE = 64
"""Texts per forward pass (padded to the batch's longest, at most ``data.max_length``)."""
PROGRESS_STEPS = 10
"""Progress lines per run (one per tenth of the rows)."""
TABLE_TEXT_WIDTH = 60
"""Characters of a text shown in ``format_table``."""


def run_batch_predict(
    cfg: ExperimentConfig,
    input: str,
    output: str | Path,
    model_spec: str | None = None,
    log=print,
    id_column: str | None = None,
    batch_size: int = BATCH_SIZE,
    sampling: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Predict for every row of ``input`` with a registered version (a classifier's labels,
    a language model's generations); write them to ``output``.

    Args:
        cfg: The experiment: its data section says how to read ``input``, its registry
            which model to use.
        input: A file, folder, glob or URI, in the format and columns of ``data.path``.
        output: ``.parquet``, ``.csv`` or ``.jsonl``; replaced only once complete.
        model_spec: ``NAME``, ``NAME@ALIAS``, ``NAME/VERSION`` or ``models:/...``; default:
            what ``serve`` deploys (``@champion``). Pinned to its version number once.
        id_column: A column of the input to use as the row id, instead of file:row.
        batch_size: Texts per forward pass (a language model: sequences decoded together).
        sampling: A language model's ``SamplingParams`` fields (``max_tokens``,
            ``temperature``, ``top_p``, ``stop``, ``seed``), as the endpoint takes them.

    Returns:
        ``rows``, ``output``, ``model_uri`` (pinned), ``model_version``, ``empty`` (rows
        with no text, whose prediction columns are null), ``skipped`` (malformed rows
        dropped under ``data.on_bad_row: skip``) and ``seconds``.

    Raises:
        LeptonError: one line (exit code 2) for a missing input, a missing column, a
            malformed row, an unknown model or an output suffix it cannot write.
    """
    from lepton_ray.data.preprocess import source_config
    from lepton_ray.data.sources import TASK_CPUS, is_uri, read_files
    from lepton_ray.pipeline import _connect
    from lepton_ray.tasks import get_task

    started = time.time()
    output = Path(output).expanduser().resolve()
    fmt = output_format(output)
    if batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, got {batch_size}")
    if not is_uri(input) and not Path(input).exists() and not glob.glob(input, recursive=True):
        raise DataError(f"--input {input}: no such file (and no file matches it as a glob)")
    model_uri, version = _pinned_model(cfg, model_spec)
    shown = model_uri if model_spec in (None, model_uri) else f"{model_spec} = {model_uri}"
    log(f"[predict] model {shown} (version {version})")

    data = source_config(cfg, input if is_uri(input) else Path(input).expanduser().resolve())
    task = get_task(cfg.task)
    required = task.source_columns(data, with_label=False)
    target = [c for _, names in task.source_columns(data) for c in names]
    target = [c for c in target if all(c not in names for _, names in required)]
    if id_column:
        required.append(("--id-column", [id_column]))
    _connect(cfg, log, storage=False)
    import ray.data

    context = ray.data.DataContext.get_current()
    saved = (context.execution_options.preserve_order, context.enable_progress_bars)
    # Rows must reach the driver in file order: that order numbers them.
    context.execution_options.preserve_order = True
    context.enable_progress_bars = True
    try:
        source = read_files(data, required, optional=target, include_paths=True)
        names = short_names(source.files)
        keep_label = bool(target) and all(c in source.columns for c in target)
        log(
            f"[predict] reading {source.n_rows} rows from {data.source_name} "
            f"({len(names)} file{'s' if len(names) != 1 else ''})"
            + (f"; {source.n_bad} malformed rows skipped" if source.n_bad else "")
        )
        if not source.n_rows:
            raise DataError(f"--input {input}: no rows to predict (every row is malformed)")
        actors, cpus = actor_pool()
        ds = source.ds.map_batches(
            prediction_input,
            batch_format="pyarrow",
            num_cpus=TASK_CPUS,
            fn_kwargs=dict(task=task, data=data, keep_label=keep_label, id_column=id_column),
        ).map_batches(
            Predictor,
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cpus,
            fn_constructor_kwargs=dict(
                tracking_uri=cfg.tracking.tracking_uri,
                model_uri=model_uri,
                model_version=version,
                torch_threads=max(1, round(cpus)),
                sampling=dict(sampling or {}),
                batch_size=batch_size,
            ),
        )
        log(f"[predict] {actors} model actor{'s' if actors > 1 else ''}, {cpus:g} CPU each")
        rows, empty = _write(ds, output, fmt, names, source.n_rows, log)
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved
    seconds = round(time.time() - started, 1)
    tail = f"; {empty} rows without text have no prediction" if empty else ""
    log(f"[predict] wrote {rows} rows to {output} in {seconds} s{tail}")
    return {
        "rows": rows,
        "output": str(output),
        "model_uri": model_uri,
        "model_version": version,
        "empty": empty,
        "skipped": source.n_bad,
        "seconds": seconds,
    }


def output_format(path: Path) -> str:
    fmt = OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"--output {path}: cannot write '{path.suffix or 'no suffix'}'; name a .parquet, "
            ".csv or .jsonl file"
        )
    if path.is_dir():
        raise DataError(f"--output {path} is a folder; name a file")
    return fmt


def _pinned_model(cfg: ExperimentConfig, spec: str | None) -> tuple[str, str]:
    """(``models:/NAME/VERSION``, VERSION): every actor loads that version, even if an
    alias moves during the run."""
    from lepton_ray.pipeline import serving_model_uri
    from lepton_ray.registry import versions

    if spec is None:
        model_uri = serving_model_uri(cfg)
    else:
        version = versions.resolve(cfg.tracking.tracking_uri, spec)
        model_uri = f"models:/{version.name}/{version.version}"
    return model_uri, model_uri.rsplit("/", 1)[1]


def actor_pool() -> tuple[int, float]:
    """(actors, CPUs per actor) of the classifier pool, from the CPUs free now.

    Ray Data starts the pool at once and it holds its CPUs for the whole run, so a pool of
    every CPU would leave the read tasks (``TASK_CPUS`` each) waiting and the actors with
    nothing to do. One
    CPU (half of what is free, when that is less than 2) stays for the reads; the rest goes
    to actors of at most one CPU each (one torch thread per CPU): on 2 CPUs, 1 actor of 1 CPU
    and 2 reads of half a CPU at a time.
    """
    import ray

    # With nothing free (another job holds every CPU), ask for a small share and wait.
    free = max(0.5, float(ray.available_resources().get("CPU", 0.0)))
    reserve = min(1.0, free / 2)
    actors = max(1, int(free - reserve))
    return actors, round(min(1.0, (free - reserve) / actors), 2)


def short_names(files: Sequence[str]) -> dict[str, str]:
    """Ray's ``path`` of each file -> its name in row ids: relative to the files' common
    folder (just the file name for one file), so ids survive moving the data."""
    # Ray's paths lack a URI's scheme (and local://); the files are listed with it.
    bare = [f.split("://", 1)[-1] for f in files]
    common = os.path.commonpath([os.path.dirname(b) for b in bare]) if bare else ""
    return {b.lstrip("/"): os.path.relpath(b, common) if common else b for b in bare}


def prediction_input(batch, task, data, keep_label: bool, id_column: str | None):
    """(in Ray Data tasks) The columns to predict from: ``text`` formatted as in training
    (``task.format_rows``), Ray's ``path``, and ``label_true`` and ``id`` when asked for."""
    import pyarrow as pa

    from lepton_ray.text import as_strings

    table = task.prediction_rows(batch, data, with_label=keep_label)
    columns = {"text": table.column("text"), "path": as_strings(batch, "path")}
    if keep_label:
        columns["label_true"] = table.column("label")
    if id_column:
        columns["id"] = as_strings(batch, id_column)
    return pa.table(columns)


class Predictor:
    """Ray Data actor: one loaded model; the task's ``predict`` on each batch (runs on a Ray
    worker)."""

    def __init__(
        self,
        tracking_uri: str,
        model_uri: str,
        model_version: str,
        torch_threads: int,
        sampling: dict[str, Any] | None = None,
        batch_size: int = BATCH_SIZE,
    ):
        import torch

        from lepton_ray.compress.formats import load_model_artifact
        from lepton_ray.tasks import get_task
        from lepton_ray.tracking.mlflow import download_model

        torch.set_num_threads(torch_threads)
        self._folder = tempfile.TemporaryDirectory(prefix="lepton-predict-")
        artifact = download_model(tracking_uri, model_uri, Path(self._folder.name))
        self.model, self.tokenizer, self.meta = load_model_artifact(artifact)
        self.task = get_task(self.meta.task)
        self.version = model_version
        self.generator = None
        if self.task.serving == "generate":
            self.generator = _Generator(
                self.model, self.tokenizer, self.meta, self.task, sampling or {}, batch_size
            )

    def __call__(self, batch):
        texts = batch.column("text").to_pylist()
        todo = [i for i, text in enumerate(texts) if text is not None and text.strip()]
        prompts = [texts[i] for i in todo]
        if not todo:
            answers = []
        elif self.generator is not None:
            answers = self.generator(prompts)
        else:
            answers = self.task.predict(self.model, self.tokenizer, self.meta, prompts)
        return prediction_columns(batch, self.task, self.meta.labels, todo, answers, self.version)


class _Generator:
    """A language model's answers through the Serve endpoint's engine: the same template,
    batching, sampling and stops (``lepton_ray.serve.engine``); a prompt too long for the
    context keeps its end and is marked ``truncated``."""

    def __init__(self, model, tokenizer, meta, task, sampling: dict[str, Any], batch_size: int):
        from lepton_ray.serve.engine import SamplingParams, artifact_engine

        task.check_tokenizer(tokenizer, meta)  # fail closed, as the endpoint does
        self.engine = artifact_engine(model, tokenizer, meta, batch_size)
        self.params = SamplingParams(**sampling)
        self.task, self.tokenizer, self.meta = task, tokenizer, meta

    def __call__(self, prompts: Sequence[str]) -> list[dict[str, Any]]:
        import torch

        from lepton_ray.serve.engine import text_of

        room = max(1, self.engine.max_context - self.params.max_tokens)
        encoded = [self.task.prompt_ids(self.tokenizer, self.meta, p) for p in prompts]
        with torch.inference_mode():
            seqs = self.engine.generate([ids[-room:] for ids in encoded], self.params)
        return [
            {
                "text": text_of(seq),
                "finish_reason": seq.finish_reason,
                "prompt_tokens": len(seq.prompt),
                "completion_tokens": seq.completion_tokens,
                "truncated": len(ids) > room,
            }
            for ids, seq in zip(encoded, seqs, strict=True)
        ]


def prediction_columns(batch, task, labels, rows: list[int], answers, version: str):
    """``batch`` plus the task's prediction columns (a classifier: ``label``, ``probability``
    of that label, ``prob_<label>`` per class, ``truncated``) and ``model_version``; null
    predictions where a row has no answer."""
    import pyarrow as pa

    n = batch.num_rows
    columns = {
        **task.prediction_arrays(list(labels), n, rows, answers),
        "model_version": pa.array([version] * n, pa.string()),
    }
    for name, values in columns.items():
        batch = batch.append_column(name, values)
    return batch


# ------------------------------------------------------------------------------------ output
def with_ids(table, names: dict[str, str], counters: dict[str, int]):
    """Number each row within its file (rows arrive in file order) and put the id columns
    first: ``id`` (``file:row``, or the input's id column), ``source`` and ``row`` (from 0,
    the header not counted; malformed rows that were skipped are not counted either)."""
    import pyarrow as pa

    sources, numbers = [], []
    for path in table.column("path").to_pylist():
        row = counters.get(path, 0)
        counters[path] = row + 1
        sources.append(names.get(path.lstrip("/"), path))
        numbers.append(row)
    ids = (
        table.column("id")
        if "id" in table.column_names
        else pa.array([f"{s}:{r}" for s, r in zip(sources, numbers)], pa.string())
    )
    rest = [c for c in table.column_names if c not in ("id", "path")]
    front = {
        "id": ids,
        "source": pa.array(sources, pa.string()),
        "row": pa.array(numbers, pa.int64()),
    }
    return pa.table({**front, **{c: table.column(c) for c in rest}})


class _Writer:
    """One output file, written batch by batch."""

    def __init__(self, path: Path, fmt: str):
        self.path, self.fmt, self._sink = path, fmt, None

    def write(self, table) -> None:
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        if self._sink is None:
            if self.fmt == "parquet":
                self._sink = pq.ParquetWriter(self.path, table.schema)
            elif self.fmt == "csv":
                self._sink = pacsv.CSVWriter(self.path, table.schema)
            else:
                self._sink = self.path.open("w", encoding="utf-8")
        if self.fmt == "jsonl":
            for row in table.to_pylist():
                self._sink.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            self._sink.write_table(table)

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()


def _without_text(table) -> int:
    """Rows with no text to predict for (null or blank: the Predictor skips them)."""
    import pyarrow.compute as pc

    text = table.column("text")
    blank = pc.equal(pc.utf8_trim_whitespace(pc.fill_null(text, "")), "")
    return int(pc.sum(blank.cast("int64")).as_py() or 0)


def _write(ds, output: Path, fmt: str, names: dict[str, str], total: int, log) -> tuple[int, int]:
    """Stream ``ds`` into ``output`` through a temporary file beside it, renamed once all
    ``total`` rows are in; returns (rows, rows without a prediction)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
    writer = _Writer(tmp, fmt)
    counters: dict[str, int] = {}
    rows = empty = 0
    step = max(1, -(-total // PROGRESS_STEPS))
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            table = with_ids(batch, names, counters)
            writer.write(table)
            empty += _without_text(table)
            before, rows = rows, rows + table.num_rows
            if rows // step > before // step or rows == total:
                log(f"[predict] {rows}/{total} rows ({100 * rows // max(total, 1)}%)")
        writer.close()
        if rows != total:
            raise StageError(
                f"batch prediction lost rows: the input holds {total} readable rows but "
                f"{rows} were predicted (a bug: please report it with this config)"
            )
        os.replace(tmp, output)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return rows, empty


# ------------------------------------------------------------------------- text mode output
def format_table(texts: Sequence[str], answers: Sequence[dict[str, Any]], task) -> str:
    """Columns ``text`` and the task's answer cells (a classifier: ``label``, ``probability``
    of that label, ``truncated``), two spaces apart; a text is shown on one line, cut at
    ``TABLE_TEXT_WIDTH`` characters; numbers are right-aligned."""
    shape = task.answer_cells(None)
    header = ("text", *shape)
    numeric = {i + 1 for i, value in enumerate(shape.values()) if not isinstance(value, str)}
    rows: list[tuple[str, ...]] = [header]
    for text, answer in zip(texts, answers, strict=True):
        shown = " ".join(text.split())
        if len(shown) > TABLE_TEXT_WIDTH:
            shown = shown[: TABLE_TEXT_WIDTH - 3] + "..."
        rows.append((shown, *(_cell(v) for v in task.answer_cells(answer).values())))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.rjust(width) if i in numeric else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths))
        ).rstrip()
        for row in rows
    )


def _cell(value: Any) -> str:
    return value if isinstance(value, str) else f"{value:.4f}"


def format_json_lines(texts: Sequence[str], answers: Sequence[dict[str, Any]]) -> str:
    """One JSON object per text: ``text`` and the endpoint's answer (``label``,
    ``probabilities``, ``truncated``)."""
    return "\n".join(
        json.dumps({"text": text, **answer}) for text, answer in zip(texts, answers, strict=True)
    )
