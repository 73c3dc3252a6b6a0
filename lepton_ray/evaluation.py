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


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    for lo, hi in zip(starts, ends):
        ranks[order[lo:hi]] = (lo + hi + 1) / 2.0
    return ranks


def binary_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half); nan if one class."""
    positives = np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if not n_pos or not n_neg:
        return float("nan")
    ranks = _average_ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_auc(probs: np.ndarray, targets: np.ndarray) -> float:
    """ROC-AUC: binary on the second class's probability; else macro one-vs-rest.

    One-vs-rest averages over the classes that have both positives and negatives among
    ``targets`` (a class absent from the split has no curve); nan when none has.
    """
    probs, targets = np.asarray(probs), np.asarray(targets)
    if len(targets) == 0 or probs.ndim != 2:
        return float("nan")
    if probs.shape[1] == 2:
        return binary_auc(probs[:, 1], targets == 1)
    aucs = [binary_auc(probs[:, c], targets == c) for c in range(probs.shape[1])]
    aucs = [a for a in aucs if not np.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def roc_points(scores: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every threshold (for plotting)."""
    positives = np.asarray(positives, dtype=bool)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    scores_sorted = np.asarray(scores)[order]
    hits = positives[order]
    last = np.r_[np.flatnonzero(scores_sorted[1:] != scores_sorted[:-1]), len(hits) - 1]
    tp = np.cumsum(hits)[last]
    fp = np.cumsum(~hits)[last]
    tpr = np.r_[0.0, tp / max(int(positives.sum()), 1)]
    fpr = np.r_[0.0, fp / max(int((~positives).sum()), 1)]
    return fpr, tpr


def evaluate(
    model,
    batches: Iterable[dict[str, Any]],
    num_labels: int,
    device=None,
    rank: int = 0,
    world_size: int = 1,
    autocast=None,
) -> dict[str, Any]:
    """Loss, accuracy, macro precision/recall/F1, ROC-AUC and the confusion matrix.

    With ``world_size > 1`` each rank takes every ``world_size``-th batch and the results
    are combined, so every example counts exactly once. Every rank runs the same number of
    forward passes (a rank out of batches runs one on a one-row dummy and drops it): under
    FSDP each forward is a collective. ``probs`` and ``targets`` come back whole, in batch
    order, on every rank. ``autocast`` is a zero-argument callable returning a context
    manager for the forward passes (bf16 on CPUs that have it).
    """
    import contextlib

    import torch
    import torch.nn.functional as F

    batches = list(batches)
    multi = (
        world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    )
    rounds = -(-len(batches) // world_size)
    confusion = torch.zeros((num_labels, num_labels), dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    mine: list[tuple[int, np.ndarray, np.ndarray]] = []
    context = autocast or contextlib.nullcontext
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for r in range(rounds):
            index = r * world_size + rank
            dummy = index >= len(batches)
            batch = batches[0] if dummy else batches[index]
            if dummy:
                batch = {k: v[:1] for k, v in batch.items()}
            batch = (
                {k: v.to(device) for k, v in batch.items()} if device is not None else dict(batch)
            )
            labels = batch.pop("labels")
            with context():
                logits = model(**batch).logits
            if dummy:
                continue
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            flat = labels * num_labels + logits.argmax(dim=-1)
            confusion += (
                torch.bincount(flat, minlength=num_labels * num_labels)
                .view(num_labels, num_labels)
                .double()
            )
            probs = torch.softmax(logits, dim=-1).cpu().numpy().astype(np.float32)
            mine.append((index, probs, labels.cpu().numpy().astype(np.int64)))
    if multi:
        torch.distributed.all_reduce(confusion)
        torch.distributed.all_reduce(loss_sum)
        gathered: list = [None] * world_size
        torch.distributed.all_gather_object(gathered, mine)
        mine = [item for part in gathered for item in part]
    if was_training:
        model.train()
    mine.sort(key=lambda item: item[0])
    probs = (
        np.concatenate([p for _, p, _ in mine]) if mine else np.zeros((0, num_labels), np.float32)
    )
    targets = np.concatenate([t for _, _, t in mine]) if mine else np.zeros(0, np.int64)
    matrix = confusion.cpu().numpy().astype(np.int64)
    total = int(matrix.sum())
    return {
        "loss": float(loss_sum.item() / total) if total else float("nan"),
        **metrics_from_confusion(matrix),
        "roc_auc": roc_auc(probs, targets),
        "confusion": matrix.tolist(),
        "examples": total,
        "probs": probs,
        "targets": targets,
    }
