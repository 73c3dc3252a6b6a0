import numpy as np
import pandas as pd
import pytest

from lepton_ray.data.clean import clean_batch, normalize_label, normalize_text
from lepton_ray.data.split import assign_split_batch, split_of
from lepton_ray.tasks.classification_eval import metrics_from_confusion


def test_normalize_text_unicode_whitespace_and_controls():
    assert normalize_text("  Ｔｈｅ\u00a0lamp \t works\u200b!\n") == "The lamp works!"
    assert normalize_text("Hello  World", lowercase=True) == "hello world"
    assert normalize_text("ﬁne", unicode_form="none") == "ﬁne"
    assert normalize_text("ﬁne", unicode_form="NFKC") == "fine"


@pytest.mark.parametrize(
    "raw, expected",
    [
        (1, "1"),
        (1.0, "1"),
        ("1", "1"),
        (" pos ", "pos"),
        (None, None),
        (float("nan"), None),
        ("", None),
        (pd.NA, None),
    ],
)
def test_normalize_label(raw, expected):
    assert normalize_label(raw) == expected


def test_clean_batch_tags_drop_reasons():
    batch = pd.DataFrame(
        {
            "text": ["ok text", "   ", None, "\u200b", "labelless", pd.NA],
            "label": ["a", "b", "a", "b", None, "a"],
        }
    )
    out = clean_batch(batch, "NFKC", False, 1)
    assert list(out["drop_reason"]) == [
        "",
        "empty_text",
        "missing_text",
        "empty_text",
        "missing_label",
        "missing_text",
    ]
    assert out.loc[0, "text"] == "ok text"


def _frame(n_per_class: int, labels=("a", "b", "c", "d")) -> pd.DataFrame:
    rows = [(f"{label} text {i}", label) for label in labels for i in range(n_per_class)]
    return pd.DataFrame(rows, columns=["text", "label"])


def test_split_is_per_row_seeded_and_partition_independent():
    frame = _frame(500)
    whole = assign_split_batch(frame, 0.1, 0.2, seed=3).set_index("text")["split"]
    # Any batching and any row order give each row the same split.
    shuffled = frame.sample(frac=1, random_state=0)
    parts = [assign_split_batch(shuffled.iloc[i::7], 0.1, 0.2, seed=3) for i in range(7)]
    pieces = pd.concat(parts).set_index("text")["split"]
    assert whole.sort_index().equals(pieces.sort_index())
    other_seed = assign_split_batch(frame, 0.1, 0.2, seed=4).set_index("text")["split"]
    assert not whole.sort_index().equals(other_seed.sort_index())


def test_split_is_stratified_by_the_fractions_in_every_class():
    out = assign_split_batch(_frame(2000), validation=0.1, test=0.2, seed=1)
    for label, group in out.groupby("label"):
        share = group["split"].value_counts(normalize=True)
        assert share["validation"] == pytest.approx(0.1, abs=0.025), label
        assert share["test"] == pytest.approx(0.2, abs=0.03), label
        assert share["train"] == pytest.approx(0.7, abs=0.035), label


def test_copies_of_a_text_land_in_the_same_split():
    frame = pd.DataFrame({"text": ["same words"] * 5 + ["other"], "label": ["a"] * 6})
    out = assign_split_batch(frame, 0.3, 0.3, seed=0)
    assert out["split"][:5].nunique() == 1


def test_split_of_respects_the_boundaries():
    top = 2**63
    assert split_of(0, 0.1, 0.2) == "test"
    assert split_of(int(0.25 * top), 0.1, 0.2) == "validation"
    assert split_of(int(0.35 * top), 0.1, 0.2) == "train"
    assert split_of(top - 1, 0.1, 0.0) == "train"


def test_metrics_from_confusion():
    cm = np.array([[8, 2], [1, 9]])
    m = metrics_from_confusion(cm)
    assert m["accuracy"] == pytest.approx(17 / 20)
    f1_a = 2 * (8 / 9) * (8 / 10) / ((8 / 9) + (8 / 10))
    f1_b = 2 * (9 / 11) * (9 / 10) / ((9 / 11) + (9 / 10))
    assert m["macro_f1"] == pytest.approx((f1_a + f1_b) / 2)
    # A class that is predicted but absent from the true labels counts (F1 0), as in sklearn.
    assert metrics_from_confusion(np.array([[5, 3], [0, 0]]))["macro_f1"] == pytest.approx(
        (2 * 1 * 0.625 / 1.625) / 2
    )
    # A class neither true nor predicted does not.
    assert metrics_from_confusion(np.array([[5, 0], [0, 0]]))["macro_f1"] == pytest.approx(1.0)


def _confusion(y_true, y_pred, k):
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


@pytest.mark.parametrize("seed", range(25))
def test_macro_metrics_match_sklearn_on_random_confusions(seed):
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 7))
    n = int(rng.integers(1, 60))
    # Skewed draws so that some classes are missing from the truth or the predictions.
    y_true = rng.choice(k, size=n, p=rng.dirichlet(np.full(k, 0.4)))
    y_pred = np.where(rng.random(n) < 0.5, y_true, rng.choice(k, size=n))
    ours = metrics_from_confusion(_confusion(y_true, y_pred, k))
    kw = dict(average="macro", zero_division=0)
    assert ours["accuracy"] == pytest.approx(metrics.accuracy_score(y_true, y_pred))
    assert ours["macro_f1"] == pytest.approx(metrics.f1_score(y_true, y_pred, **kw))
    assert ours["macro_precision"] == pytest.approx(metrics.precision_score(y_true, y_pred, **kw))
    assert ours["macro_recall"] == pytest.approx(metrics.recall_score(y_true, y_pred, **kw))
