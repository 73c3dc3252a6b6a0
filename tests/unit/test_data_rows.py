"""The data stage's batch transforms, without Ray: duplicate resolution, counting,
tokenization, and the per-partition writer's exact counts."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pytest

from lepton_ray.data.clean import clean_batch
from lepton_ray.data.rows import (
    RAW_TEXT,
    SEEN_IN_TRAINING,
    Tokenize,
    batch_encoder,
    finalize_partition,
    merge_summaries,
    prepare_batch,
    resolve_duplicates,
    summarize_batch,
    tokenizer_spec,
    trained_key_parts,
)
from lepton_ray.data.split import KEY, assign_split_batch, text_key


def _rows(items):
    frame = pd.DataFrame(items, columns=["text", "label", "split"])
    frame[KEY] = [hash(t) & (2**62) for t in frame["text"]]
    frame["drop_reason"] = ""
    for kind in ("email", "url", "phone"):
        frame[f"masked_{kind}"] = 0
    return frame


ROWS = [
    ("a", "x", "train"),
    ("a", "x", "train"),  # duplicate
    ("b", "x", "train"),
    ("b", "y", "train"),  # conflict 1:1
    ("c", "x", "train"),
    ("c", "x", "train"),
    ("c", "y", "train"),  # conflict 2:1
    ("d", "x", "train"),
    ("d", "x", "test"),  # contaminated
]


@pytest.mark.parametrize(
    "conflicts,kept",
    [
        ("drop", {("a", "x", "train"), ("d", "x", "train"), ("d", "x", "test")}),
        (
            "majority",
            {("a", "x", "train"), ("c", "x", "train"), ("d", "x", "train"), ("d", "x", "test")},
        ),
        (
            "keep",
            {
                ("a", "x", "train"),
                ("b", "x", "train"),
                ("b", "y", "train"),
                ("c", "x", "train"),
                ("c", "y", "train"),
                ("d", "x", "train"),
                ("d", "x", "test"),
            },
        ),
    ],
)
def test_resolve_duplicates_policies(conflicts, kept):
    out = resolve_duplicates(_rows(ROWS), exact=True, conflicts=conflicts, contamination="report")
    live = out[out["drop_reason"] == ""]
    assert set(map(tuple, live[["text", "label", "split"]].values)) == kept
    assert len(live) == len(kept)  # one row per kept (text, label, split)
    assert out["contaminated"].sum() == 1
    summary = merge_summaries([summarize_batch(out)])
    assert sum(summary["reasons"].values()) == len(ROWS)
    assert summary["conflict_texts"] == 2  # b and c, whatever the policy


def test_contamination_remove_drops_the_eval_copy_only():
    out = resolve_duplicates(_rows(ROWS), exact=True, conflicts="drop", contamination="remove")
    gone = out[out["drop_reason"] == "contaminated"]
    assert list(map(tuple, gone[["text", "split"]].values)) == [("d", "test")]


def test_eval_rows_a_model_trained_on_are_dropped_and_counted(tmp_path):
    import numpy as np
    import pyarrow.parquet as pq

    # "a" and "d" were trained on: d's test copy goes, and so does a's new validation row.
    rows = _rows([*ROWS, ("a", "x", "validation")])
    pq.write_table(pa.table({"text": ["a", "d", "zz"]}), tmp_path / "train.parquet")
    parts = trained_key_parts(str(tmp_path / "train.parquet"), seed=0, parts=2)
    keys = np.concatenate(parts)
    assert sorted(keys) == sorted(text_key(t, 0) for t in ("a", "d", "zz"))
    assert all((part % 2 == i).all() for i, part in enumerate(parts))  # as partition_block
    rows[KEY] = [text_key(t, 0) for t in rows["text"]]
    out = resolve_duplicates(rows, True, "drop", "report", seen=keys)
    gone = out[out["drop_reason"] == SEEN_IN_TRAINING]
    assert sorted(map(tuple, gone[["text", "split"]].values)) == [
        ("a", "validation"),
        ("d", "test"),
    ]
    assert (out.loc[out["split"] == "train", "drop_reason"] != SEEN_IN_TRAINING).all()
    summary = merge_summaries([summarize_batch(out)])
    assert summary["seen"] == {"validation": 1, "test": 1}


def test_prepare_batch_splits_with_assign_split_batch():
    batch = pd.DataFrame({"text": [f"  Text {i} " for i in range(400)], "label": ["a"] * 400})
    clean = dict(unicode_form="NFKC", lowercase=False, min_chars=1)
    out = prepare_batch(batch, clean, seed=3, hashed={"validation": 0.2, "test": 0.1})
    expected = assign_split_batch(clean_batch(batch, **clean), 0.2, 0.1, seed=3)
    assert out[[KEY, "split"]].equals(expected[[KEY, "split"]])
    assert set(out["split"]) == {"train", "validation", "test"}


@pytest.fixture(scope="module")
def spec():
    return tokenizer_spec("minilm")


def test_fast_tokenizer_json_matches_transformers(spec):
    from lepton_ray.artifacts import load_tokenizer

    texts = ["Hello, World!", "naïve café — ÜBER", "x " * 200, "What is the capital of Peru ?"]
    expected = load_tokenizer("minilm")(texts, truncation=True, max_length=16)["input_ids"]
    assert batch_encoder(spec, 16)(texts) == expected


def test_tokenize_skips_dropped_rows_and_finalize_counts_exactly(spec):
    frame = _rows([("good film", "pos", "train"), ("", "neg", "train"), ("bad", "neg", "test")])
    frame.loc[1, "drop_reason"] = "empty_text"
    table = Tokenize(spec, 8)(frame)
    ids = table.column("input_ids").to_pylist()
    assert ids[1] == [] and len(ids[0]) > 2
    table = table.append_column("conflict_text", pa.array([0, 0, 0])).append_column(
        "contaminated", pa.array([False] * 3)
    )
    result = finalize_partition(
        table,
        task="sequence_classification",
        labels=["neg", "pos"],
        drops=frozenset(),
        augment=None,
        tokenizer=spec,
        max_length=8,
    )
    assert set(result["tables"]) == {"train", "test"}
    train = result["tables"]["train"].to_pydict()
    assert train["label_id"] == [1] and train["length"] == [len(ids[0])]
    assert result["stats"]["test"]["classes"] == [1, 0]
    assert sum(result["stats"]["train"]["lengths"]) == 1


def test_prepare_batch_keeps_the_raw_text_of_evaluation_rows_only():
    texts = [f"  <b>Text</b> {i} " for i in range(200)] + [None]
    batch = pd.DataFrame({"text": texts, "label": ["a"] * 201})
    clean = dict(unicode_form="NFKC", lowercase=True, min_chars=1, strip_html=True)
    hashed = {"validation": 0.3, "test": 0.2}
    out = prepare_batch(batch, clean, seed=3, hashed=hashed, keep_raw=True)
    evaluation = out["split"].isin(["validation", "test"]) & (out["drop_reason"] == "")
    assert evaluation.any() and (out["split"] == "train").any()
    assert out.loc[evaluation, RAW_TEXT].tolist() == [
        texts[i] for i in evaluation[evaluation].index
    ]
    assert (out.loc[evaluation, "text"] != out.loc[evaluation, RAW_TEXT]).all()  # cleaned
    assert (out.loc[out["split"] == "train", RAW_TEXT] == "").all()
    assert out[RAW_TEXT].iloc[-1] == ""  # the missing text
    assert all(isinstance(t, str) for t in out[RAW_TEXT])
    assert RAW_TEXT not in prepare_batch(batch, clean, seed=3, hashed=hashed).columns


@pytest.mark.parametrize("keep_raw", [True, False])
def test_finalize_writes_raw_text_for_evaluation_splits_only(spec, keep_raw):
    rows = [
        ("good film", "pos", "train"),
        ("bad film", "neg", "validation"),
        ("great film", "pos", "test"),
    ]
    frame = _rows(rows)
    raw = ["", "<i>Bad</i> FILM", "Great   Film"]
    if keep_raw:
        frame[RAW_TEXT] = raw
    table = Tokenize(spec, 8)(frame)
    table = table.append_column("conflict_text", pa.array([0, 0, 0])).append_column(
        "contaminated", pa.array([False] * 3)
    )
    augment = dict(copies=1, deletion_rate=1.0, swap_rate=0.0, seed=0)
    result = finalize_partition(
        table,
        task="sequence_classification",
        labels=["neg", "pos"],
        drops=frozenset(),
        augment=augment,
        tokenizer=spec,
        max_length=8,
        keep_raw=keep_raw,
    )
    tables = result["tables"]
    assert set(tables) == {"train", "validation", "test"}
    assert tables["train"].num_rows == 2  # with an augmented copy
    assert RAW_TEXT not in tables["train"].column_names
    for split, text in (("validation", raw[1]), ("test", raw[2])):
        names = tables[split].column_names
        assert (RAW_TEXT in names) == keep_raw, (split, names)
        if keep_raw:
            assert tables[split].column(RAW_TEXT).to_pylist() == [text]
            assert tables[split].schema.field(RAW_TEXT).type == pa.string()
        assert tables[split].column("text").to_pylist() == [
            rows[1 if split == "validation" else 2][0]
        ]
