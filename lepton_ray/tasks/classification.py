"""Sequence classification: a text in, one of the data's labels out.

The first task behind the protocol (``tasks/base.py``): a transformers model with a
classification head over the labels the data stage found, one integer class id per row,
cross-entropy (the model's own loss), accuracy / macro precision, recall, F1 / ROC-AUC, and
answers carrying a label with every label's probability.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, ClassVar

from lepton_ray.errors import DataError
from lepton_ray.tasks.base import Task, encode_texts
from lepton_ray.text import as_strings

if TYPE_CHECKING:
    from lepton_ray.config import DataConfig, ModelConfig

#: ``evaluate``'s scalar scores, by name; each is reported to Tune and MLflow as ``val_<name>``.
SCORES = ("loss", "accuracy", "macro_f1", "macro_precision", "macro_recall", "roc_auc")


def sorted_labels(values: Iterable[str]) -> list[str]:
    """Labels in their stored order: numerically when every one is an integer, else by name."""
    values = sorted(set(values))
    if all(v.lstrip("-").isdigit() for v in values):
        return sorted(values, key=int)
    return values


class SequenceClassification(Task):
    name: ClassVar[str] = "sequence_classification"
    auto_class: ClassVar[str] = "AutoModelForSequenceClassification"
    peft_task_type: ClassVar[str] = "SEQ_CLS"
    target_column: ClassVar[str] = "label_id"
    metrics: ClassVar[tuple[str, ...]] = (
        "val_accuracy",
        "val_macro_f1",
        "val_macro_precision",
        "val_macro_recall",
        "val_loss",
        "train_loss",
    )
    keep_float: ClassVar[tuple[str, ...]] = ("classifier",)
    gate_score: ClassVar[str] = "accuracy"

    # ------------------------------------------------------------------ data
    def source_columns(
        self, data: DataConfig, with_label: bool = True
    ) -> list[tuple[str, list[str]]]:
        columns = [("data.text_column", data.text_columns)]
        if with_label:
            columns.append(("data.label_column", [data.label_column]))
        return columns

    def format_rows(self, batch, data: DataConfig, with_label: bool = True):
        """``text``: the text columns joined by ``data.text_join``, blanks skipped (all blank
        stays missing, null, as a lone column's empty cell would be); ``label`` as strings."""
        import pyarrow as pa
        import pyarrow.compute as pc

        texts = [as_strings(batch, c) for c in data.text_columns]
        text = texts[0]
        if len(texts) > 1:
            null = pa.scalar(None, pa.string())
            parts = [pc.if_else(pc.equal(t, ""), null, t) for t in texts]
            text = parts[0]
            for part in parts[1:]:
                joined = pc.binary_join_element_wise(text, part, data.text_join)
                text = pc.coalesce(joined, text, part)
        columns = {"text": text}
        if with_label:
            columns["label"] = as_strings(batch, data.label_column)
        return pa.table(columns)

    def vocabulary(self, found: Iterable[str], where: str) -> list[str]:
        labels = sorted_labels(found)
        if len(labels) < 2:
            raise DataError(
                f"{where} has a single class ({labels[0]!r}); classification needs at least 2"
            )
        return labels

    def encode_targets(self, labels: Sequence[str], vocabulary: Sequence[str]):
        import numpy as np

        index = {label: i for i, label in enumerate(vocabulary)}
        return np.array([index[x] for x in labels], dtype=np.int64)

    # ------------------------------------------------------------------ model
    def model_config(self, path: str, labels: list[str], overrides: dict[str, Any]):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(
            path,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            **overrides,
        )

    def build_model(self, path: str, cfg: ModelConfig, labels: list[str], seed: int = 0):
        import torch

        from lepton_ray.config.regularization import set_dropout

        hf_config = self.model_config(path, labels, cfg.config_overrides)
        set_dropout(hf_config, cfg.dropout)
        if cfg.random_init:
            torch.manual_seed(seed)
            return self.load_class().from_config(hf_config)
        return self.load_class().from_pretrained(path, config=hf_config)

    # ------------------------------------------------------------------ batches
    def collate(self, input_ids: Sequence[Sequence[int]], targets, pad_id: int) -> dict:
        from lepton_ray.tasks.classification_eval import collate

        return collate(input_ids, targets, pad_id)

    def loss(self, outputs, batch, label_smoothing: float = 0.0):
        """The model's cross-entropy; smoothed, the same over the class logits in float32."""
        if not label_smoothing:
            return outputs.loss
        import torch.nn.functional as F

        logits = outputs.logits.float()
        return F.cross_entropy(logits, batch["labels"], label_smoothing=label_smoothing)

    def distill_loss(self, student_outputs, teacher_outputs, batch, temperature: float):
        """The KL over the class logits, averaged over the batch's examples."""
        from lepton_ray.tasks.distill import class_kl

        return class_kl(student_outputs.logits, teacher_outputs.logits, temperature)

    # ------------------------------------------------------------------ evaluation
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
        from lepton_ray.tasks.classification_eval import evaluate

        return evaluate(model, batches, len(labels), device, rank, world_size, autocast)

    def reported(self, result: dict[str, Any]) -> dict[str, float]:
        return {name: result[name] for name in SCORES}

    def summary(self, result: dict[str, Any]) -> str:
        return (
            f"val_loss {result['loss']:.4f} val_accuracy {result['accuracy']:.4f} "
            f"val_macro_f1 {result['macro_f1']:.4f} val_roc_auc {result['roc_auc']:.4f}"
        )

    def agreement(self, before: dict[str, Any], after: dict[str, Any]) -> float | None:
        return float((before["probs"].argmax(1) == after["probs"].argmax(1)).mean())

    def plot_inputs(self, result: dict[str, Any]) -> dict[str, Any]:
        return {k: result[k] for k in ("confusion", "probs", "targets")}

    def plots(self, inputs: dict[str, Any], labels: Sequence[str], title: str) -> dict[str, Any]:
        from lepton_ray.tracking import plots

        return {
            "confusion_matrix": plots.confusion_matrix(inputs["confusion"], labels, title),
            "roc_curve": plots.roc_curve(inputs["probs"], inputs["targets"], labels, title),
        }

    # ------------------------------------------------------------------ prediction
    def predict(self, model, tokenizer, meta, texts: Sequence[str]) -> list[dict[str, Any]]:
        """Each answer: ``label``, ``probabilities`` (label -> probability, rounded to 6
        places) and ``truncated`` (whether the text was longer than the model's
        ``max_length``)."""
        import torch

        labels = list(meta.labels)
        encoded, truncated = encode_texts(tokenizer, meta, list(texts))
        with torch.inference_mode():
            probs = torch.softmax(model(**encoded).logits.float(), dim=-1).tolist()
        out = []
        for row, cut in zip(probs, truncated, strict=True):
            best = max(range(len(row)), key=row.__getitem__)
            out.append(
                {
                    "label": labels[best],
                    "probabilities": {label: round(p, 6) for label, p in zip(labels, row)},
                    "truncated": bool(cut),
                }
            )
        return out

    def prediction_schema(self, labels: Sequence[str]) -> list[tuple[str, str]]:
        return [
            ("label", "string"),
            ("truncated", "boolean"),
            *((f"prob_{label}", "double") for label in labels),
        ]

    def prediction_row(self, answer: dict[str, Any]) -> dict[str, Any]:
        return {
            "label": answer["label"],
            "truncated": answer["truncated"],
            **{f"prob_{label}": p for label, p in answer["probabilities"].items()},
        }

    def answer_cells(self, answer: dict[str, Any] | None) -> dict[str, str | float]:
        if answer is None:
            return {"label": "", "probability": 0.0, "truncated": ""}
        return {
            "label": str(answer["label"]),
            "probability": float(answer["probabilities"][answer["label"]]),
            "truncated": "yes" if answer.get("truncated") else "no",
        }

    def prediction_arrays(
        self, labels: Sequence[str], n: int, rows: Sequence[int], answers: Sequence[dict]
    ) -> dict[str, Any]:
        """``label``, ``probability`` (of that label), ``prob_<label>`` per class and
        ``truncated``."""
        import pyarrow as pa

        label: list[str | None] = [None] * n
        best: list[float | None] = [None] * n
        truncated: list[bool | None] = [None] * n
        per_class: dict[str, list[float | None]] = {name: [None] * n for name in labels}
        for i, answer in zip(rows, answers, strict=True):
            probabilities = answer["probabilities"]
            label[i], best[i] = answer["label"], probabilities[answer["label"]]
            truncated[i] = answer["truncated"]
            for name in labels:
                per_class[name][i] = probabilities[name]
        return {
            "label": pa.array(label, pa.string()),
            "probability": pa.array(best, pa.float64()),
            **{f"prob_{name}": pa.array(v, pa.float64()) for name, v in per_class.items()},
            "truncated": pa.array(truncated, pa.bool_()),
        }
