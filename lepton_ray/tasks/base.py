"""The task protocol: everything that differs between kinds of model, in one place.

A stage never names a task. It asks the experiment's task (``get_task(cfg.task)``) or an
artifact's (``get_task(meta.task)``) what it needs:

- config: ``validate`` (cross-section rules) and ``metrics`` (what ``tune.metric`` may name);
- data: ``source_columns`` and ``format_rows`` (a source's columns -> the task's rows),
  ``vocabulary`` (the labels found in the kept rows, with the task's checks) and
  ``encode_targets`` (each row's training target, stored beside ``input_ids`` in the column
  ``target_column``);
- training: ``build_model`` and ``peft_task_type``, ``collate``, ``loss`` (None: the model's
  own), ``evaluate`` -> ``reported`` metrics and ``plots``;
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


class Task(ABC):
    """One kind of model, from raw rows to answers. Subclasses are stateless singletons."""

    #: The ``task:`` value of an experiment (and ``lepton_model.json``) that selects it.
    name: ClassVar[str]
    #: The transformers auto class that builds and loads the model.
    auto_class: ClassVar[str]
    #: ``peft.TaskType`` member name of its adapters.
    peft_task_type: ClassVar[str]
    #: Column of the tokenized splits that holds each row's training target.
    target_column: ClassVar[str]
    #: Reported metrics ``tune.metric`` may name (the direction of each follows from its
    #: name: ``config.metric_mode``).
    metrics: ClassVar[tuple[str, ...]]
    #: Modules compression keeps in float unless ``compress.keep_float`` says otherwise.
    keep_float: ClassVar[tuple[str, ...]] = ()
    #: The score ``compress.max_drop`` always judges (``tune.metric`` is judged as well).
    gate_score: ClassVar[str]

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

    def load_class(self):
        """The transformers class that loads this task's saved weights."""
        import transformers

        return getattr(transformers, self.auto_class)

    # ------------------------------------------------------------------ batches and loss
    @abstractmethod
    def collate(self, input_ids: Sequence[Sequence[int]], targets, pad_id: int) -> dict:
        """Pad a batch of token rows (dynamic padding) with their targets as ``labels``."""

    def loss(self, outputs, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of a forward pass; the model's own unless a task says otherwise."""
        return outputs.loss

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

    def frame_batches(self, frame, batch_size: int, pad_id: int):
        """Collated batches of a pandas frame with ``input_ids`` and ``target_column``."""
        ids, targets = list(frame["input_ids"]), list(frame[self.target_column])
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
