"""Batching and classification metrics, shared by training, compression and benchmarks.

Pure torch: no Ray, so the same code runs under torchrun or on a GPU box without Ray.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import numpy as np


def collate(input_ids: Sequence[Sequence[int]], label_ids: Sequence[int] | None, pad_id: int):
    """Pad a batch to its longest row (dynamic padding: short texts cost less).

    ``input_ids``: one sequence of token ids per row (lists, or numpy views of a flat array
    as ``TokenRows.sequences`` gives them). The one collate of training, evaluation and
    compression.
    """
    import torch

    lengths = [len(seq) for seq in input_ids]
    width = max(lengths, default=0)
    ids = np.full((len(lengths), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(lengths), width), dtype=np.int64)
    for row, (seq, n) in enumerate(zip(input_ids, lengths)):
        ids[row, :n] = seq
        mask[row, :n] = 1
    batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    if label_ids is not None:
        batch["labels"] = torch.from_numpy(np.array(label_ids, dtype=np.int64))
    return batch


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
    sorted_values = values[order]
    new_group = np.r_[True, sorted_values[1:] != sorted_values[:-1]]
    starts = np.flatnonzero(new_group)
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = ((starts + ends + 1) / 2.0)[np.cumsum(new_group) - 1]
    return ranks


def binary_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half).

    nan when it is undefined: only one class among ``positives``, or a score that is not
    finite (a diverged model).
    """
    positives = np.asarray(positives, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if not n_pos or not n_neg or not np.isfinite(scores).all():
        return float("nan")
    ranks = _average_ranks(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_auc(probs: np.ndarray, targets: np.ndarray) -> float:
    """ROC-AUC of N x C class probabilities against integer labels.

    Two classes: the AUC of the second class's probability. More: the macro mean of the
    one-vs-rest AUCs, as scikit-learn's ``roc_auc_score(targets, probs, multi_class="ovr",
    average="macro")`` when every class occurs in ``targets``. A class absent from
    ``targets`` (possible in a small validation split) has no ROC curve: scikit-learn then
    raises (or, given ``labels=``, returns nan); here such a class is left out of the mean,
    so the score stays defined from the classes that do occur. nan when no class has both
    positives and negatives (a single class in ``targets``) or a probability is not finite.
    """
    probs, targets = np.asarray(probs), np.asarray(targets)
    if len(targets) == 0 or probs.ndim != 2 or len(probs) != len(targets):
        return float("nan")
    if probs.shape[1] == 2:
        return binary_auc(probs[:, 1], targets == 1)
    aucs = [binary_auc(probs[:, c], targets == c) for c in range(probs.shape[1])]
    aucs = [a for a in aucs if not np.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def roc_points(scores: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1).

    For plotting: the same points as ``sklearn.metrics.roc_curve(...,
    drop_intermediate=False)``. A rate whose class is empty stays 0.
    """
    positives = np.asarray(positives, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) == 0:
        return np.zeros(1), np.zeros(1)
    order = np.argsort(-scores, kind="mergesort")
    scores_sorted = scores[order]
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
    autocast: Callable[[], AbstractContextManager] | None = None,
) -> dict[str, Any]:
    """Loss, accuracy, macro precision/recall/F1, ROC-AUC and the confusion matrix.

    Returns ``loss`` (mean cross-entropy, nan without examples), ``accuracy``,
    ``macro_precision``, ``macro_recall``, ``macro_f1``, ``roc_auc`` (nan if undefined),
    ``confusion`` (nested lists, rows true), ``examples``, and ``probs`` (N x C float32)
    and ``targets`` (N int64) for the whole set, in batch order.

    With ``world_size > 1`` each rank takes every ``world_size``-th batch (batch ``i`` on
    rank ``i % world_size``) and the results are combined, so every example counts exactly
    once; ``probs`` and ``targets`` come back whole on every rank. Every rank runs the same
    number of forward passes, ``ceil(n / world_size)``: under FSDP each forward is a
    collective, so a rank out of batches runs one on a one-row dummy (the first row of the
    first batch) and drops its output. ``batches`` must be the same on every rank. Without
    an initialized process group nothing is combined: the result covers this rank's batches
    only (what a single-process test of one rank's share sees).

    ``autocast`` is a zero-argument callable returning a context manager for each forward
    pass (e.g. ``Precision.autocast``: bf16 on CPUs that have it); logits are scored in
    float32.
    """
    import torch
    import torch.nn.functional as F

    batches = list(batches)
    multi = (
        world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    )
    rounds = -(-len(batches) // world_size) if batches else 0
    confusion = torch.zeros((num_labels, num_labels), dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    mine: list[tuple[int, np.ndarray, np.ndarray]] = []
    context = autocast or contextlib.nullcontext
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for r in range(rounds):
                index = r * world_size + rank
                dummy = index >= len(batches)
                batch = {k: v[:1] for k, v in batches[0].items()} if dummy else batches[index]
                if device is not None:
                    batch = {k: v.to(device) for k, v in batch.items()}
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                with context():
                    logits = model(**inputs).logits
                if dummy:
                    continue
                labels = batch["labels"]
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
    finally:
        if was_training:
            model.train()
    if multi:
        torch.distributed.all_reduce(confusion)
        torch.distributed.all_reduce(loss_sum)
        gathered: list = [None] * world_size
        torch.distributed.all_gather_object(gathered, mine)
        mine = [item for part in gathered for item in part]
    mine.sort(key=lambda item: item[0])
    probs = (
        np.concatenate([p for _, p, _ in mine])
        if mine
        else np.zeros((0, num_labels), dtype=np.float32)
    )
    targets = np.concatenate([t for _, _, t in mine]) if mine else np.zeros(0, dtype=np.int64)
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
