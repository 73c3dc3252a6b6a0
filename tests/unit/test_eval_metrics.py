"""ROC-AUC against scikit-learn, ``evaluate`` order and forward counts, ROC/learning figures."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from lepton_ray.tasks.classification_eval import (
    binary_auc,
    collate,
    evaluate,
    metrics_from_confusion,
    roc_auc,
    roc_points,
)


def _probs(rng: np.random.Generator, n: int, c: int, decimals: int | None) -> np.ndarray:
    probs = rng.dirichlet(np.ones(c), size=n)
    if decimals is not None:  # coarse scores: many ties
        probs = np.round(probs, decimals)
        probs[:, -1] = 1.0 - probs[:, :-1].sum(axis=1)
    return probs


@pytest.mark.parametrize("decimals", [None, 1, 2])
def test_binary_roc_auc_matches_sklearn(decimals):
    rng = np.random.default_rng(0)
    for _ in range(60):
        n = int(rng.integers(2, 80))
        targets = rng.integers(0, 2, size=n)
        if len(set(targets)) < 2:
            targets[0], targets[1] = 0, 1
        probs = _probs(rng, n, 2, decimals)
        assert roc_auc(probs, targets) == pytest.approx(roc_auc_score(targets, probs[:, 1]))


@pytest.mark.parametrize("decimals", [None, 1, 2])
def test_multiclass_roc_auc_matches_sklearn(decimals):
    rng = np.random.default_rng(1)
    for _ in range(60):
        c = int(rng.integers(3, 7))
        n = int(rng.integers(c, 120))
        targets = np.r_[np.arange(c), rng.integers(0, c, size=n - c)]  # every class occurs
        rng.shuffle(targets)
        probs = _probs(rng, n, c, decimals)
        expected = roc_auc_score(targets, probs, multi_class="ovr", average="macro")
        assert roc_auc(probs, targets) == pytest.approx(expected)


def test_multiclass_roc_auc_leaves_out_an_absent_class():
    rng = np.random.default_rng(2)
    probs = _probs(rng, 40, 4, None)
    targets = rng.integers(0, 3, size=40)  # class 3 never occurs
    targets[:3] = [0, 1, 2]
    # scikit-learn refuses (class count != columns): the mean runs over classes 0..2.
    with pytest.raises(ValueError):
        roc_auc_score(targets, probs, multi_class="ovr", average="macro")
    expected = np.mean([roc_auc_score(targets == c, probs[:, c]) for c in range(3)])
    assert roc_auc(probs, targets) == pytest.approx(expected)


def test_roc_auc_undefined_is_nan():
    probs = np.array([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
    assert math.isnan(roc_auc(probs, np.array([1, 1, 1])))
    assert math.isnan(roc_auc(np.full((3, 3), 1 / 3), np.array([2, 2, 2])))
    assert math.isnan(roc_auc(np.zeros((0, 2)), np.zeros(0, dtype=np.int64)))
    assert math.isnan(roc_auc(np.array([[np.nan, np.nan], [0.5, 0.5]]), np.array([0, 1])))
    assert math.isnan(binary_auc(np.array([0.1, 0.9]), np.array([False, False])))


def test_roc_auc_extremes():
    targets = np.array([0, 0, 1, 1])
    assert roc_auc(np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9]]), targets) == 1.0
    assert roc_auc(np.array([[0.1, 0.9], [0.3, 0.7], [0.8, 0.2], [0.9, 0.1]]), targets) == 0.0
    assert roc_auc(np.full((4, 2), 0.5), targets) == 0.5


def test_roc_points_match_sklearn():
    rng = np.random.default_rng(3)
    for decimals in (None, 1):
        scores = rng.random(50) if decimals is None else np.round(rng.random(50), decimals)
        positives = rng.random(50) < 0.4
        fpr, tpr = roc_points(scores, positives)
        sk_fpr, sk_tpr, _ = sk_roc_curve(positives, scores, drop_intermediate=False)
        np.testing.assert_allclose(fpr, sk_fpr)
        np.testing.assert_allclose(tpr, sk_tpr)
        assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)


# --- evaluate -------------------------------------------------------------------------


class FakeClassifier(torch.nn.Module):
    """Logits from a fixed table indexed by each row's first token; counts its forwards."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.clone(), requires_grad=False)
        self.calls: list[int] = []  # rows per forward

    def forward(self, input_ids, attention_mask):
        assert input_ids.shape == attention_mask.shape
        self.calls.append(len(input_ids))
        return SimpleNamespace(logits=self.table[input_ids[:, 0]])


def _setup(n_rows: int, num_labels: int, batch_size: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(n_rows, num_labels, generator=gen) * 2
    labels = torch.randint(0, num_labels, (n_rows,), generator=gen)
    rows = [[i, 7, 7][: 1 + i % 3] for i in range(n_rows)]  # ragged: padding happens
    batches = [
        collate(rows[s : s + batch_size], labels[s : s + batch_size].tolist(), pad_id=0)
        for s in range(0, n_rows, batch_size)
    ]
    return FakeClassifier(table), batches, table, labels


def _expected(table: torch.Tensor, labels: torch.Tensor, num_labels: int) -> dict:
    probs = torch.softmax(table, dim=-1).numpy()
    y, pred = labels.numpy(), table.argmax(dim=-1).numpy()
    matrix = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(matrix, (y, pred), 1)
    loss = torch.nn.functional.cross_entropy(table, labels).item()
    return {"probs": probs, "targets": y, "confusion": matrix, "loss": loss}


@pytest.mark.parametrize("num_labels", [2, 4])
def test_evaluate_matches_direct_metrics(num_labels):
    model, batches, table, labels = _setup(37, num_labels, batch_size=8)
    model.train()
    out = evaluate(model, iter(batches), num_labels)
    want = _expected(table, labels, num_labels)
    assert model.training  # mode restored
    assert model.calls == [8, 8, 8, 8, 5]
    assert out["examples"] == 37
    assert out["probs"].dtype == np.float32 and out["probs"].shape == (37, num_labels)
    assert out["targets"].dtype == np.int64
    np.testing.assert_array_equal(out["targets"], want["targets"])
    np.testing.assert_allclose(out["probs"], want["probs"], rtol=1e-5, atol=1e-6)
    assert out["confusion"] == want["confusion"].tolist()
    assert out["loss"] == pytest.approx(want["loss"], rel=1e-6)
    for key, value in metrics_from_confusion(want["confusion"]).items():
        assert out[key] == pytest.approx(value)
    if num_labels == 2:
        expected_auc = roc_auc_score(want["targets"], want["probs"][:, 1])
    else:
        expected_auc = roc_auc_score(
            want["targets"], want["probs"], multi_class="ovr", average="macro"
        )
    assert out["roc_auc"] == pytest.approx(expected_auc)


def test_evaluate_autocast_scores_in_float32():
    model, batches, table, labels = _setup(10, 3, batch_size=4)
    entered = []

    def autocast():
        entered.append(1)
        return torch.autocast("cpu", dtype=torch.bfloat16)

    out = evaluate(model, batches, 3, autocast=autocast)
    assert len(entered) == len(model.calls) == 3
    assert out["probs"].dtype == np.float32
    assert out["examples"] == 10


@pytest.mark.parametrize(
    ("n_batches", "rank", "real", "dummies"),
    [(5, 0, [0, 2, 4], 0), (5, 1, [1, 3], 1), (4, 1, [1, 3], 0), (1, 1, [], 1)],
)
def test_evaluate_every_rank_runs_the_same_forwards(n_batches, rank, real, dummies):
    # world_size 2 without a process group: nothing is gathered, the result is this
    # rank's share; every rank still runs ceil(n / 2) forwards, padding with a dummy.
    model, batches, table, labels = _setup(4 * n_batches, 3, batch_size=4, seed=n_batches)
    out = evaluate(model, batches, 3, rank=rank, world_size=2)
    assert len(model.calls) == math.ceil(n_batches / 2) == len(real) + dummies
    assert model.calls[len(real) :] == [1] * dummies  # the dummy is one row
    rows = np.array([4 * b + i for b in real for i in range(4)], dtype=int)
    assert out["examples"] == len(rows)
    want = _expected(table, labels, 3)
    np.testing.assert_array_equal(out["targets"], want["targets"][rows])
    np.testing.assert_allclose(out["probs"], want["probs"][rows], rtol=1e-5, atol=1e-6)


def test_evaluate_no_batches():
    model, _, _, _ = _setup(4, 3, batch_size=4)
    for rank, world_size in ((0, 1), (1, 2)):
        out = evaluate(model, [], 3, rank=rank, world_size=world_size)
        assert model.calls == []
        assert out["examples"] == 0
        assert math.isnan(out["loss"]) and math.isnan(out["roc_auc"])
        assert out["probs"].shape == (0, 3) and out["probs"].dtype == np.float32
        assert out["targets"].shape == (0,) and out["targets"].dtype == np.int64
        assert out["confusion"] == [[0] * 3] * 3


# --- figures --------------------------------------------------------------------------


def _close(fig):
    import matplotlib.pyplot as plt

    plt.close(fig)


def _curve_labels(ax) -> list[str]:
    return [line.get_label() for line in ax.get_lines()]


def test_roc_curve_figure():
    from lepton_ray.tracking import plots

    rng = np.random.default_rng(4)
    probs = _probs(rng, 60, 2, None)
    targets = rng.integers(0, 2, size=60)
    fig = plots.roc_curve(probs, targets, ["neg", "pos"], "ROC")
    try:
        labels = _curve_labels(fig.axes[0])
        assert len(labels) == 2 and labels[-1] == "chance"
        assert labels[0] == f"pos (AUC {roc_auc(probs, targets):.3f})"
    finally:
        _close(fig)

    probs = _probs(rng, 60, 4, 2)
    targets = rng.integers(0, 3, size=60)  # "d" never occurs: no curve for it
    fig = plots.roc_curve(probs, targets, ["a", "b", "c", "d"], "ROC")
    try:
        labels = _curve_labels(fig.axes[0])
        assert len(labels) == 4
        assert [label.split()[0] for label in labels] == ["a", "b", "c", "chance"]
    finally:
        _close(fig)


def test_learning_curves_by_step_and_epoch():
    from lepton_ray.tracking import plots

    by_step = [
        {
            "epoch": e / 2,
            "step": 10 * e,
            "train_loss": 1 / e,
            "val_loss": 1.1 / e,
            "val_accuracy": 0.5,
            "val_macro_f1": 0.4,
            "val_roc_auc": 0.6,
        }
        for e in range(1, 5)
    ]
    fig = plots.learning_curves(by_step)
    try:
        ax_loss, ax_metric = fig.axes
        assert ax_loss.get_xlabel() == "step"
        assert len(ax_loss.get_lines()) == 2 and len(ax_metric.get_lines()) == 3
        assert list(ax_loss.get_lines()[0].get_xdata()) == [10, 20, 30, 40]
    finally:
        _close(fig)

    # Older entries: no step, no train_loss, no val_macro_f1 or val_roc_auc.
    by_epoch = [{"epoch": e, "val_loss": 0.5, "val_accuracy": 0.7} for e in range(1, 4)]
    by_epoch[1]["step"] = 5  # not every entry has a step: the x axis stays the epoch
    fig = plots.learning_curves(by_epoch)
    try:
        ax_loss, ax_metric = fig.axes
        assert ax_loss.get_xlabel() == "epoch"
        assert _curve_labels(ax_loss) == ["validation"]
        assert _curve_labels(ax_metric) == ["val_accuracy"]
    finally:
        _close(fig)

    fig = plots.learning_curves([])
    _close(fig)


def _distributed_worker(rank: int, world_size: int, init_file: str, n_batches: int, queue):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        model, batches, _, _ = _setup(4 * n_batches - 1, 3, batch_size=4, seed=5)
        out = evaluate(model, batches, 3, rank=rank, world_size=world_size)
        queue.put((rank, len(model.calls), out))
    finally:
        dist.destroy_process_group()


def test_evaluate_gathers_across_a_process_group(tmp_path):
    """Two gloo ranks: whole probs/targets in batch order and full metrics on both.

    Five batches: rank 0 scores 0, 2, 4 and rank 1 scores 1, 3 plus a dummy forward.
    """
    n_batches = 5
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(
            target=_distributed_worker,
            args=(rank, 2, str(tmp_path / "pg"), n_batches, queue),
        )
        for rank in range(2)
    ]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        rank, calls, out = queue.get(timeout=120)
        results[rank] = (calls, out)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    model, batches, table, labels = _setup(4 * n_batches - 1, 3, batch_size=4, seed=5)
    want = _expected(table, labels, 3)
    for rank in range(2):
        calls, out = results[rank]
        assert calls == math.ceil(n_batches / 2)
        assert out["examples"] == len(labels)
        np.testing.assert_array_equal(out["targets"], want["targets"])
        np.testing.assert_allclose(out["probs"], want["probs"], rtol=1e-5, atol=1e-6)
        assert out["confusion"] == want["confusion"].tolist()
        assert out["loss"] == pytest.approx(want["loss"], rel=1e-6)
