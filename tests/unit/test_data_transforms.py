from collections import Counter

import numpy as np
import pandas as pd
import pytest

from lepton_ray.data.clean import clean_batch, normalize_label, normalize_text
from lepton_ray.data.split import assign_splits, split_sizes
from lepton_ray.evaluation import metrics_from_confusion


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


@pytest.mark.parametrize(
    "n, val, test", [(100, 0.1, 0.1), (7, 0.2, 0.2), (1, 0.3, 0.3), (3, 0.4, 0.4)]
)
def test_split_sizes_keep_train_nonempty(n, val, test):
    n_train, n_val, n_test = split_sizes(n, val, test)
    assert n_train + n_val + n_test == n
    assert n_train >= 1


def _group(n: int, label: str = "a", dupes: int = 0) -> pd.DataFrame:
    texts = [f"text {i}" for i in range(n)] + [f"text {i}" for i in range(dupes)]
    return pd.DataFrame({"text": texts, "label": [label] * len(texts)})


def test_assign_splits_exact_stratified_counts_and_dedup():
    out = assign_splits(_group(100, dupes=5), validation=0.1, test=0.2, seed=1, dedup=True)
    counts = Counter(out["split"])
    assert counts == {"train": 70, "validation": 10, "test": 20, "duplicate": 5}
    kept = out[out["split"] != "duplicate"]
    assert kept["text"].is_unique


def test_assign_splits_is_deterministic_and_seeded():
    frame = _group(200)
    a = assign_splits(frame, 0.1, 0.1, seed=3, dedup=True).set_index("text")["split"]
    b = assign_splits(frame.sample(frac=1, random_state=0), 0.1, 0.1, seed=3, dedup=True).set_index(
        "text"
    )["split"]
    c = assign_splits(frame, 0.1, 0.1, seed=4, dedup=True).set_index("text")["split"]
    assert a.sort_index().equals(b.sort_index())  # row order does not matter
    assert not a.sort_index().equals(c.sort_index())  # the seed does


def test_assign_splits_without_dedup_keeps_duplicates():
    out = assign_splits(_group(10, dupes=3), 0.0, 0.0, seed=0, dedup=False)
    assert (out["split"] == "train").sum() == 13


def test_metrics_from_confusion():
    cm = np.array([[8, 2], [1, 9]])
    m = metrics_from_confusion(cm)
    assert m["accuracy"] == pytest.approx(17 / 20)
    f1_a = 2 * (8 / 9) * (8 / 10) / ((8 / 9) + (8 / 10))
    f1_b = 2 * (9 / 11) * (9 / 10) / ((9 / 11) + (9 / 10))
    assert m["macro_f1"] == pytest.approx((f1_a + f1_b) / 2)
    # A class absent from the labels does not count towards macro-F1.
    assert metrics_from_confusion(np.array([[5, 0], [0, 0]]))["macro_f1"] == pytest.approx(1.0)
