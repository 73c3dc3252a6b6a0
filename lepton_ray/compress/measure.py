"""What compression measures of a model, for any task: the evaluation sets (a split's token
rows and whatever else the task evaluates with), the task's scores, and speed.

Speed is what serving a model of that kind costs: a forward pass per row for a model that
answers in one (throughput at batch ``SPEED_BATCH``, latency at batch 1), and for a model
that generates text (``can_generate``) greedy generation too: generated tokens per second
for one prompt at a time and for ``GENERATION_BATCHES[-1]`` prompts at once.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from lepton_ray.config import ExperimentConfig
from lepton_ray.data.rows import RAW_TEXT
from lepton_ray.data.split_files import open_split
from lepton_ray.tasks import Task

SPEED_BATCH = 32
"""Batch size of the evaluation passes whose throughput is logged (``samples_per_s_*``)."""
LATENCY_ROWS = 32
"""Single-row forward passes timed for ``latency_ms_batch1_*``."""
LATENCY_BATCHES = 8
"""Forward passes of ``serving_batch`` rows timed for ``p50_ms_batch<n>_*``."""
GENERATION_BATCHES = (1, 8)
"""Prompts generated together for ``tokens_per_s_batch<n>_*``."""
GENERATION_TOKENS = 32
"""New tokens each prompt generates when generation speed is timed (no early stop)."""
GENERATION_ROUNDS = 2
"""Timed generate calls per batch size (after one untimed warm-up)."""


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id or 0


def split_columns(task: Task) -> list[str]:
    """The columns of a tokenized split that the task's batches are built from: the ids and
    the stored target column(s) (one value per row, or per-token list columns)."""
    targets = task.stored_targets()
    return ["input_ids", *((targets,) if isinstance(targets, str) else targets)]


class SplitBatches:
    """A split's token batches, streamed from its files again each time they are iterated:
    the float and the compressed model are both scored on it, and it is never held whole.

    ``generation`` and ``extra`` are what the task evaluates with beyond the batches (a
    language model's fixed sample of prompts to generate from, and its scorer); None and
    ``{}`` for a task without them."""

    def __init__(self, task: Task, rows, pad: int, generation=None, extra=None):
        self.task, self.rows, self.pad_id = task, rows, pad
        self.generation = generation
        self.extra = dict(extra or {})

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for frame in self.rows:
            yield from self.task.frame_batches(frame, SPEED_BATCH, self.pad_id)


def _texts_of(frame) -> list[str]:
    return frame[RAW_TEXT if RAW_TEXT in frame.columns else "text"].tolist()


def evaluation_set(
    cfg: ExperimentConfig, task: Task, split: str, tokenizer, meta
) -> SplitBatches | None:
    """The batches of ``split`` (None when preprocessing left it empty), read with the task's
    target columns, plus what the task's own scoring data carries beyond batches (its
    ``generation`` sample, built from the split's texts by the artifact's template, as the
    promotion gate scores a version). Both models are measured on this same set."""
    rows = open_split(cfg, split, split_columns(task))
    if rows is None:
        return None
    texts = open_split(cfg, split)
    if texts is not None:
        import pyarrow.parquet as pq

        names = [set(pq.read_schema(f).names) for f in texts.files]
        texts.columns = [RAW_TEXT if all(RAW_TEXT in n for n in names) else "text"]
    # A task whose scoring data is a plain stream of batches (a generator) reads nothing here.
    scored = task.scoring_data(texts or [], _texts_of, tokenizer, meta, cfg)
    generation = getattr(scored, "generation", None)
    extra = getattr(scored, "extra", None)
    if hasattr(scored, "close"):
        scored.close()
    return SplitBatches(task, rows, pad_id(tokenizer), generation, extra)


def calibration_batches(cfg: ExperimentConfig, task: Task, tokenizer) -> list[dict[str, Any]]:
    """``compress.calibration_rows`` seeded rows of the training split (never validation:
    that split judges the result), read by row group: the split is never held whole."""
    return training_batches(cfg, task, tokenizer, cfg.compress.calibration_rows)


def training_batches(
    cfg: ExperimentConfig, task: Task, tokenizer, rows: int, batch_size: int = SPEED_BATCH
) -> list[dict[str, Any]]:
    """Up to ``rows`` rows of the training split drawn with ``train.seed``, in batches of
    ``batch_size``; ``[]`` without a training split."""
    train = open_split(cfg, "train", split_columns(task))
    frame = None if train is None else train.sample(rows, cfg.train.seed)
    if frame is None:
        return []
    return list(task.frame_batches(frame, batch_size, pad_id(tokenizer)))


def evaluate(task: Task, model, batches: Iterable[dict[str, Any]], labels) -> dict[str, Any]:
    """The task's scores (``gate_scores``, every score a gate may compare) and, for a task
    that counts examples, their throughput; ``result`` keeps the raw evaluation."""
    started = time.perf_counter()
    result = task.evaluate(model, batches, labels)
    seconds = time.perf_counter() - started
    out = {"scores": task.gate_scores(result), "result": result}
    if "examples" in result:
        out["samples_per_s"] = result["examples"] / seconds
    return out


def _rows(batches: Iterable[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """Up to ``count`` single rows of the batches, their padding cut off, targets dropped."""
    rows: list[dict[str, Any]] = []
    for batch in batches:
        for i in range(len(batch["input_ids"])):
            length = int(batch["attention_mask"][i].sum())
            rows.append(
                {
                    k: v[i : i + 1, :length] if v.dim() == 2 else v[i : i + 1]
                    for k, v in batch.items()
                    if k != "labels"
                }
            )
            if len(rows) >= count:
                return rows
    return rows


def _median_ms(task: Task, model, inputs: Sequence[dict[str, Any]]) -> float:
    """Median milliseconds of a forward pass over each of ``inputs`` (after one warm-up)."""
    import torch

    if not inputs:
        return float("nan")
    times = []
    with torch.inference_mode():
        model(**task.model_inputs(inputs[0], model))  # warm-up
        for batch in inputs:
            started = time.perf_counter()
            model(**task.model_inputs(batch, model))
            times.append(time.perf_counter() - started)
    return 1000.0 * statistics.median(times)


def latency_ms(task: Task, model, batches: Iterable[dict[str, Any]]) -> float:
    """Median milliseconds of a one-row forward pass over up to LATENCY_ROWS rows."""
    return _median_ms(task, model, _rows(batches, LATENCY_ROWS))


def _stack(rows: Sequence[dict[str, Any]], pad: int) -> dict[str, Any]:
    """Single rows (``_rows``) as one right-padded batch: ids padded with ``pad``, every
    other per-token column with 0."""
    import torch

    width = max(int(row["input_ids"].shape[1]) for row in rows)
    batch: dict[str, Any] = {}
    for key in rows[0]:
        parts = []
        for row in rows:
            value = row[key]
            if value.dim() == 2 and value.shape[1] < width:
                fill = pad if key == "input_ids" else 0
                extra = torch.full((1, width - value.shape[1]), fill, dtype=value.dtype)
                value = torch.cat([value, extra], dim=1)
            parts.append(value)
        batch[key] = torch.cat(parts, dim=0)
    return batch


def batch_latency_ms(
    task: Task, model, batches: Iterable[dict[str, Any]], size: int, pad: int
) -> float:
    """Median milliseconds of a forward pass over ``size`` rows at once (padded to the
    longest of them), over up to LATENCY_BATCHES such batches after one warm-up."""
    rows = _rows(batches, size * LATENCY_BATCHES)
    groups = [_stack(rows[i : i + size], pad) for i in range(0, len(rows) - size + 1, size)]
    return _median_ms(task, model, groups)


def can_generate(model) -> bool:
    """Whether ``model`` generates text (``model.generate``): a transformers model says so."""
    check = getattr(model, "can_generate", None)
    return callable(getattr(model, "generate", None)) and callable(check) and bool(check())


def generation_prompts(data, count: int) -> list[list[int]]:
    """``count`` prompts (token ids) to time generation on: the task's generation sample
    where it has one, else the leading tokens of the split's rows; repeated to ``count``."""
    sample = getattr(data, "generation", None)
    prompts = [list(p) for p in sample.prompts] if sample is not None else []
    if not prompts:
        prompts = [
            [int(t) for t in row["input_ids"][0, :GENERATION_TOKENS]] for row in _rows(data, count)
        ]
    prompts = [p for p in prompts if p]
    return [prompts[i % len(prompts)] for i in range(count)] if prompts else []


def tokens_per_s(model, prompts: Sequence[Sequence[int]], batch: int, pad: int) -> float:
    """Greedy generation throughput: new tokens per second, ``batch`` prompts at a time
    (left padded), each generating exactly GENERATION_TOKENS tokens (no early stop, so
    every model is timed on the same work)."""
    import torch

    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    room = max(1, int(limit) - GENERATION_TOKENS) if limit else None
    chunk = [list(p)[-room:] if room else list(p) for p in prompts[:batch]]
    if len(chunk) < batch:
        return float("nan")
    width = max(len(p) for p in chunk)
    ids = torch.full((batch, width), pad, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for row, prompt in enumerate(chunk):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    device = next(model.parameters()).device
    settings = {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "do_sample": False,
        "pad_token_id": pad,
    }
    with torch.inference_mode():
        model.generate(**settings, max_new_tokens=2, min_new_tokens=2)  # warm-up
        made, seconds = 0, 0.0
        for _ in range(GENERATION_ROUNDS):
            started = time.perf_counter()
            out = model.generate(
                **settings, max_new_tokens=GENERATION_TOKENS, min_new_tokens=GENERATION_TOKENS
            )
            seconds += time.perf_counter() - started
            made += (out.shape[1] - width) * batch
    return made / seconds if seconds > 0 else float("nan")


def speed(
    task: Task,
    model,
    data,
    pad: int,
    evaluated: dict[str, Any] | None = None,
    serving_batch: int | None = None,
) -> dict[str, float]:
    """The speed figures of ``model`` on ``data`` (an evaluation set), by metric name
    without the ``_fp32``/``_compressed`` tag: ``samples_per_s`` and
    ``latency_ms_batch<SPEED_BATCH>`` where the evaluation counted examples (``evaluated``),
    ``latency_ms_batch1`` (the median of one-row passes: the p50), ``p50_ms_batch<n>`` for a
    ``serving_batch`` n, and for a generating model ``tokens_per_s_batch<n>``."""
    out: dict[str, float] = {}
    if evaluated is not None and "samples_per_s" in evaluated:
        out["samples_per_s"] = evaluated["samples_per_s"]
        out[f"latency_ms_batch{SPEED_BATCH}"] = 1000.0 * SPEED_BATCH / evaluated["samples_per_s"]
    out["latency_ms_batch1"] = latency_ms(task, model, data)
    if serving_batch:
        out[f"p50_ms_batch{serving_batch}"] = batch_latency_ms(
            task, model, data, serving_batch, pad
        )
    if can_generate(model):
        prompts = generation_prompts(data, max(GENERATION_BATCHES))
        for batch in GENERATION_BATCHES:
            out[f"tokens_per_s_batch{batch}"] = (
                tokens_per_s(model, prompts, batch, pad) if prompts else float("nan")
            )
    return out
