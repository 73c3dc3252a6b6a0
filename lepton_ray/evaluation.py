"""Batching and classification metrics, shared by training, compression and benchmarks.

Pure torch: no Ray, so the same code runs under torchrun or on a GPU box without Ray.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np


def collate(input_ids: Sequence[Sequence[int]], label_ids: Sequence[int] | None, pad_id: int):
    """Pad a batch to its longest row (dynamic padding: short texts cost less)."""
    import torch

    longest = max(len(ids) for ids in input_ids)
    ids = torch.full((len(input_ids), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(input_ids), longest), dtype=torch.long)
    for row, seq in enumerate(input_ids):
        ids[row, : len(seq)] = torch.from_numpy(np.array(seq, dtype=np.int64))
        mask[row, : len(seq)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if label_ids is not None:
        batch["labels"] = torch.as_tensor(np.asarray(label_ids, dtype=np.int64))
    return batch


def frame_batches(frame, batch_size: int, pad_id: int) -> Iterator[dict[str, Any]]:
    """Batches from a pandas frame with ``input_ids`` and ``label_id`` columns."""
    ids, labels = list(frame["input_ids"]), list(frame["label_id"])
    for start in range(0, len(ids), batch_size):
        yield collate(ids[start : start + batch_size], labels[start : start + batch_size], pad_id)


def metrics_from_confusion(matrix: np.ndarray) -> dict[str, float]:
    """Accuracy and macro precision, recall and F1 (rows: true, columns: predicted).

    The standard (scikit-learn) definition: the macro average runs over every class that
    is in the true labels or in the predictions, and a score with a zero denominator is 0.
    So a class that is predicted but never true counts, with F1 0, and drags the mean
    down; a class neither true nor predicted does not count.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    total = matrix.sum()
    tp = np.diag(matrix)
    predicted, actual = matrix.sum(axis=0), matrix.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    counted = (actual > 0) | (predicted > 0)

    def macro(values: np.ndarray) -> float:
        return float(values[counted].mean()) if counted.any() else 0.0

    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_precision": macro(precision),
        "macro_recall": macro(recall),
        "macro_f1": macro(f1),
    }


def evaluate(
    model,
    batches: Iterable[dict[str, Any]],
    num_labels: int,
    device=None,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """Loss, accuracy, macro-F1 and the confusion matrix over every batch.

    With ``world_size > 1`` each rank takes every ``world_size``-th batch and the sums are
    all-reduced, so every example counts exactly once and no rank drops any.
    """
    import torch
    import torch.nn.functional as F

    confusion = torch.zeros((num_labels, num_labels), dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for index, batch in enumerate(batches):
            if index % world_size != rank:
                continue
            batch = {k: v.to(device) for k, v in batch.items()} if device is not None else batch
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            pred = logits.argmax(dim=-1)
            flat = labels * num_labels + pred
            confusion += (
                torch.bincount(flat, minlength=num_labels * num_labels)
                .view(num_labels, num_labels)
                .double()
            )
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(confusion)
        torch.distributed.all_reduce(loss_sum)
    if was_training:
        model.train()
    matrix = confusion.cpu().numpy().astype(np.int64)
    total = int(matrix.sum())
    return {
        "loss": float(loss_sum.item() / total) if total else float("nan"),
        **metrics_from_confusion(matrix),
        "confusion": matrix.tolist(),
        "examples": total,
    }
