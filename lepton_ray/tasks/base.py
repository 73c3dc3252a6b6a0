"""The task protocol: everything that differs between kinds of model, in one place.

A stage never names a task. It asks the experiment's task (``get_task(cfg.task)``) or an
artifact's (``get_task(meta.task)``) what it needs:

- config: ``validate`` (cross-section rules) and ``metrics`` (what ``tune.metric`` may name);
- data: ``source_columns`` and ``format_rows`` (a source's columns -> the task's rows),
  ``vocabulary`` (the labels found in the kept rows, with the task's checks) and
  ``encode_targets`` (each row's training target, stored beside ``input_ids`` in the column
  ``target_column``);
- training: ``build_model`` and ``peft_task_type``, ``collate``, ``loss`` (None: the model's
  own), ``distill_loss`` (the teacher term of ``train.distill``), ``evaluate`` ->
  ``reported`` metrics and ``plots``;
- prediction: ``predict`` (raw texts -> answers, as ``predict`` and ``serve`` return them),
  ``prediction_schema``/``prediction_row`` (the MLflow pyfunc model's table),
  ``answer_cells`` (``lepton-ray predict``'s table) and
  ``prediction_arrays`` (the columns ``batch-predict`` adds);
- compression: ``keep_float`` (modules left in float) and ``gate_scores``.

``labels`` travels through every stage as the task's vocabulary: class names for a
classifier (what the data stage found, what an artifact's ``lepton_model.json`` records); a
task without classes has none. Pure Python and torch: no Ray, so ``train/loop.py`` can run a
task under torchrun.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, ClassVar

from lepton_ray.text import clean_texts

if TYPE_CHECKING:
    import torch

    from lepton_ray.artifacts import ModelMeta
    from lepton_ray.config import DataConfig, ExperimentConfig, ModelConfig


def encode_texts(
    tokenizer, meta: ModelMeta, texts: Sequence[str], max_length: int | None = None
) -> tuple[Any, list[bool]]:
    """Clean raw texts as training did, then tokenize them for the model.

    Returns ``(inputs, truncated)``: the padded ``BatchEncoding`` of torch tensors, truncated
    at ``max_length`` (default ``meta.max_length``) tokens, and per text whether truncation cut
    it. Every caller that runs a loaded model on raw text goes through here.
    """
    limit = int(max_length or meta.max_length)
    cleaned = clean_texts(texts, meta.cleaning)
    inputs = tokenizer(
        cleaned, truncation=True, max_length=limit, padding=True, return_tensors="pt"
    )
    truncated = [False] * len(cleaned)
    if "attention_mask" in inputs:
        lengths = inputs["attention_mask"].sum(dim=1).tolist()
    else:
        pad = tokenizer.pad_token_id
        lengths = [sum(1 for t in row if t != pad) for row in inputs["input_ids"].tolist()]
    # Only a text that fills the limit can have been cut; measure just those in full.
    full = [i for i, n in enumerate(lengths) if n >= limit]
    if full:
        ids = tokenizer([cleaned[i] for i in full], truncation=False, verbose=False)["input_ids"]
        for i, row in zip(full, ids, strict=True):
            truncated[i] = len(row) > limit
    return inputs, truncated


def input_texts(model_input) -> list[str]:
    """A pyfunc's texts: a list, a Series, one string, or a frame's ``text`` (else first)
    column; a ``ValueError`` naming the first item that is not a string."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        column = "text" if "text" in model_input.columns else model_input.columns[0]
        values = model_input[column].tolist()
    elif isinstance(model_input, pd.Series):
        values = model_input.tolist()
    elif isinstance(model_input, str):
        values = [model_input]
    else:
        values = list(model_input)
    bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
    if bad:
        raise ValueError(f"texts must be strings; item {bad[0]} is {type(values[bad[0]]).__name__}")
    return values


class Task(ABC):
    """One kind of model, from raw rows to answers. Subclasses are stateless singletons."""

    #: The ``task:`` value of an experiment (and ``lepton_model.json``) that selects it.
    name: ClassVar[str]
    #: The transformers auto class that builds and loads the model.
    auto_class: ClassVar[str]
    #: ``peft.TaskType`` member name of its adapters.
    peft_task_type: ClassVar[str]
    #: The PEFT methods with virtual tokens (``peft.method`` prefix, prompt) whose outputs
    #: its loss, evaluation and prediction read correctly.
    peft_virtual_token_methods: ClassVar[tuple[str, ...]] = ("prefix", "prompt")
    #: Column of the tokenized splits that holds each row's training target.
    target_column: ClassVar[str]
    #: Every target column; more than one (or list columns) means per-token targets that
    #: the task's tokenizer writes beside ``input_ids`` (a language model's labels, parts).
    target_columns: ClassVar[tuple[str, ...]] = ()
    #: Reported metrics ``tune.metric`` may name (the direction of each follows from its
    #: name: ``config.metric_mode``).
    metrics: ClassVar[tuple[str, ...]]
    #: Modules compression keeps in float unless ``compress.keep_float`` says otherwise.
    keep_float: ClassVar[tuple[str, ...]] = ()
    #: The score ``compress.max_drop`` always judges (``tune.metric`` is judged as well).
    gate_score: ClassVar[str]
    # Which Serve application answers for this task's models: "predict" (/v1/predict, a
    # batched forward pass) or "generate" (the OpenAI-compatible generation API).
    serving: ClassVar[str] = "predict"

    # ------------------------------------------------------------------ config
    def validate(self, cfg: ExperimentConfig) -> list[str]:
        """Cross-section problems of ``cfg`` for this task, each naming the YAML keys."""
        return []

    # ------------------------------------------------------------------ data
    @abstractmethod
    def source_columns(
        self, data: DataConfig, with_label: bool = True
    ) -> list[tuple[str, list[str]]]:
        """(the YAML key that names them, columns) a source must have for this task; without
        the training target's columns when ``with_label`` is false (prediction input)."""

    @abstractmethod
    def format_rows(self, batch, data: DataConfig, with_label: bool = True):
        """(in Ray Data tasks) A pyarrow batch of the source -> the task's rows, a pyarrow
        table with ``text`` (what is cleaned, deduplicated and split on) and, ``with_label``,
        ``label`` (the raw target, cleaned by the data stage)."""

    def prediction_rows(self, batch, data: DataConfig, with_label: bool = False):
        """(in Ray Data tasks) What batch prediction feeds the model: ``text``, and with
        ``with_label`` the ``label`` a row already has. Default: ``format_rows``."""
        return self.format_rows(batch, data, with_label=with_label)

    def clean(self, batch, clean: dict[str, Any]):
        """(in Ray Data tasks) Clean the rows of ``format_rows`` and tag drop reasons; None:
        the data stage's text cleaning (``data.clean.clean_batch``)."""
        return None

    def encoder(self, model_name: str, max_length: int, options: dict[str, Any]):
        """(in Ray Data actors) texts -> ``{"input_ids": [...], <target column>: [...],
        "drop": [reason or '']}`` for tasks with per-token targets; None: the data stage's
        plain tokenizer (ids only, truncated at ``max_length``)."""
        return None

    @property
    def token_targets(self) -> bool:
        """Whether the targets are per token (written by ``encoder``), not per row."""
        return bool(self.target_columns)

    def stored_targets(self) -> str | tuple[str, ...]:
        """The target column(s) of the tokenized splits, as ``TokenRows.from_frames`` takes
        them: a column of a value per row, or a tuple of per-token list columns."""
        return self.target_columns or self.target_column

    def shortener(
        self, max_length: int, special_ids: set[int], cfg: ExperimentConfig
    ) -> Callable[[Any, Any], tuple[Any, Any] | None]:
        """How a stored row (numpy ids and its targets) tokenized longer than ``max_length``
        is cut to it, as tokenizing at that length would have: a sweep tokenizes once at
        ``data.max_length`` and a trial searching a shorter one cuts its rows. Returns the
        row's (ids, targets), or None to drop it. Here (a target per row): the first tokens
        and a closing special token ([SEP]) where the row ends with one."""
        import numpy as np

        def cut(ids, target):
            if len(ids) <= max_length:
                return ids, target
            if int(ids[-1]) in special_ids:
                return np.concatenate([ids[: max_length - 1], ids[-1:]]), target
            return ids[:max_length], target

        return cut

    @abstractmethod
    def vocabulary(self, found: Iterable[str], where: str) -> list[str]:
        """The labels (in their stored order) from those found in the kept rows; raises
        ``DataError`` starting with ``where`` (the label column and source) where the task
        cannot learn them."""

    @abstractmethod
    def encode_targets(self, labels: Sequence[str], vocabulary: Sequence[str]):
        """The ``target_column`` values (a numpy array) of rows with these labels."""

    # ------------------------------------------------------------------ model
    @abstractmethod
    def build_model(self, path: str, cfg: ModelConfig, labels: list[str], seed: int = 0):
        """The model to fine-tune from ``path`` (``model.name`` resolved): pretrained
        weights, or random ones from its config (``model.random_init``)."""

    @abstractmethod
    def model_config(self, path: str, labels: list[str], overrides: dict[str, Any]):
        """The transformers config of ``path`` for this task (a head for ``labels``)."""

    def prepare_tokenizer(self, tokenizer, cfg: ExperimentConfig):
        """The tokenizer as training uses it and the artifact saves it."""
        return tokenizer

    def meta_extra(self, tokenizer, cfg: ExperimentConfig) -> dict[str, Any]:
        """What the artifact's ``lepton_model.json`` records for this task (``extra``)."""
        return {}

    def load_class(self):
        """The transformers class that loads this task's saved weights."""
        import transformers

        return getattr(transformers, self.auto_class)

    # ------------------------------------------------------------------ batches and loss
    @abstractmethod
    def collate(self, input_ids: Sequence[Sequence[int]], targets, pad_id: int) -> dict:
        """Pad a batch of token rows (dynamic padding) with their targets as ``labels``."""

    def model_inputs(self, batch: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
        """What the model's forward gets of a collated batch."""
        return batch

    def loss(
        self, outputs, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0
    ) -> torch.Tensor:
        """The training loss of a forward pass; the model's own unless a task says otherwise.
        ``label_smoothing`` (``train.label_smoothing``): that share of each target is spread
        evenly over every class (token); a task that cannot smooth refuses it."""
        if label_smoothing:
            raise NotImplementedError(f"task {self.name} has no label smoothing")
        return outputs.loss

    def weight(self, targets) -> int:
        """How much a batch with these targets weighs in a step's mean loss (its examples;
        a language model's trained tokens)."""
        return len(targets)

    def distill_loss(
        self, student_outputs, teacher_outputs, batch: dict[str, torch.Tensor], temperature: float
    ) -> torch.Tensor:
        """KL(teacher_T || student_T) of a micro-batch, averaged as ``loss`` is (over its
        examples; a language model's trained tokens), in float32, without the ``T**2`` and
        the weight that ``train.distill`` mixes it in with (``tasks/distill.py``)."""
        raise NotImplementedError(f"task {self.name} has no distillation loss")

    # ------------------------------------------------------------------ evaluation
    @abstractmethod
    def evaluate(
        self,
        model,
        batches: Iterable[dict[str, Any]],
        labels: Sequence[str],
        device=None,
        rank: int = 0,
        world_size: int = 1,
        autocast: Callable[[], AbstractContextManager] | None = None,
    ) -> dict[str, Any]:
        """Score ``model`` on ``batches`` (every rank together); the task's raw result."""

    @abstractmethod
    def reported(self, result: dict[str, Any]) -> dict[str, float]:
        """The scalar metrics of an ``evaluate`` result, by their names without ``val_``."""

    @abstractmethod
    def summary(self, result: dict[str, Any]) -> str:
        """One log line's worth of an ``evaluate`` result."""

    def plot_inputs(self, result: dict[str, Any]) -> dict[str, Any]:
        """What ``plots`` needs of an ``evaluate`` result (travels with the report)."""
        return {}

    def plots(self, inputs: dict[str, Any], labels: Sequence[str], title: str) -> dict[str, Any]:
        """Figures of an evaluation by name (the caller logs ``plots/<name>_<split>.png``)."""
        return {}

    def gate_scores(self, result: dict[str, Any]) -> dict[str, float]:
        """Every score a promotion or compression gate may compare, from ``evaluate``."""
        return {k: float(v) for k, v in self.reported(result).items()}

    def agreement(self, before: dict[str, Any], after: dict[str, Any]) -> float | None:
        """How often two models' ``evaluate`` results answer alike (None: not defined)."""
        return None

    def evaluation_data(self, rows, batch_size: int, pad_id: int, tokenizer, cfg):
        """What ``evaluate`` gets of validation ``rows`` (``TokenRows``): collated batches,
        longest first (little padding); the same on every rank."""
        import numpy as np

        order = np.argsort(-rows.lengths, kind="stable")
        cuts = [order[i : i + batch_size] for i in range(0, len(rows), batch_size)]
        return [self.collate(rows.sequences(cut), rows.targets_of(cut), pad_id) for cut in cuts]

    def frame_targets(self, frame) -> list:
        """Each row's targets of a frame of a tokenized split: a value per row, or for
        per-token targets a ``(tokens, columns)`` array per row."""
        import numpy as np

        if not self.token_targets:
            return list(frame[self.target_column])
        columns = [frame[c].tolist() for c in self.target_columns]
        return [np.stack([np.asarray(c[i]) for c in columns], axis=1) for i in range(len(frame))]

    def scoring_data(self, frames, texts_of: Callable, tokenizer, meta: ModelMeta, cfg):
        """What ``evaluate`` gets to score a loaded artifact on a split's raw texts (the
        gate, compression): batches encoded by the artifact's own cleaning, tokenizer and
        ``max_length``, streamed from ``frames`` (one frame held at a time).
        ``texts_of(frame)``: the texts of a frame to read."""
        import torch

        size = cfg.train.eval_batch_size

        def batch(texts, targets):
            encoded, _ = encode_texts(tokenizer, meta, texts)
            return {**encoded, "labels": torch.as_tensor(targets)}

        texts: list[str] = []
        targets: list = []
        for frame in frames:
            texts += texts_of(frame)
            targets += frame[self.target_column].tolist()
            while len(texts) >= size:
                yield batch(texts[:size], targets[:size])
                del texts[:size], targets[:size]
        if texts:
            yield batch(texts, targets)

    def tables(self, inputs: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
        """Tables of an evaluation by name (``plot_inputs``; logged with ``mlflow.log_table``)."""
        return {}

    def frame_batches(self, frame, batch_size: int, pad_id: int):
        """Collated batches of a pandas frame with ``input_ids`` and the target columns."""
        ids, targets = list(frame["input_ids"]), self.frame_targets(frame)
        for start in range(0, len(ids), batch_size):
            end = start + batch_size
            yield self.collate(ids[start:end], targets[start:end], pad_id)

    # ------------------------------------------------------------------ prediction
    @abstractmethod
    def predict(self, model, tokenizer, meta, texts: Sequence[str]) -> list[dict[str, Any]]:
        """One forward pass over raw ``texts`` (cleaned and tokenized as in training)."""

    def predict_batched(
        self, model, tokenizer, meta, texts: Sequence[str], batch_size: int = 32
    ) -> list[dict[str, Any]]:
        """``predict`` in batches of ``batch_size`` texts (bounded memory for long lists)."""
        out: list[dict[str, Any]] = []
        for start in range(0, len(texts), batch_size):
            out.extend(self.predict(model, tokenizer, meta, texts[start : start + batch_size]))
        return out

    def pyfunc_signature(self, labels: Sequence[str]):
        """The MLflow signature of the task's pyfunc: one unnamed string column in, the
        ``prediction_schema`` table out."""
        from mlflow.models import ModelSignature
        from mlflow.types import ColSpec, DataType, Schema

        columns = self.prediction_schema(labels)
        outputs = Schema([ColSpec(getattr(DataType, kind), name) for name, kind in columns])
        return ModelSignature(inputs=Schema([ColSpec(DataType.string)]), outputs=outputs)

    def pyfunc_predict(self, model, tokenizer, meta, model_input, params: dict[str, Any]):
        """The pyfunc's ``predict``: texts (a list, Series, or a frame's ``text`` or first
        column) -> a frame of ``prediction_schema``."""
        import pandas as pd

        answers = self.predict_batched(model, tokenizer, meta, input_texts(model_input))
        columns = [name for name, _ in self.prediction_schema(meta.labels)]
        return pd.DataFrame([self.prediction_row(a) for a in answers], columns=columns)

    @abstractmethod
    def prediction_schema(self, labels: Sequence[str]) -> list[tuple[str, str]]:
        """``(column, MLflow DataType name)`` of the pyfunc model's output table."""

    @abstractmethod
    def prediction_row(self, answer: dict[str, Any]) -> dict[str, Any]:
        """One ``predict`` answer as a row of ``prediction_schema``."""

    @abstractmethod
    def answer_cells(self, answer: dict[str, Any] | None) -> dict[str, str | float]:
        """The columns of one answer in ``lepton-ray predict``'s table (numbers stay numbers);
        given None, the same keys with placeholder values (the header of an empty table)."""

    @abstractmethod
    def prediction_arrays(
        self, labels: Sequence[str], n: int, rows: Sequence[int], answers: Sequence[dict]
    ) -> dict[str, Any]:
        """Arrow columns of ``n`` rows for ``batch-predict``: ``answers[k]`` belongs to row
        ``rows[k]``, the other rows get nulls."""
