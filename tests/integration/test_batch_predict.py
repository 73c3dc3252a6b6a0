"""`lepton-ray predict`: offline batch inference over files with Ray Data, and the text mode.

A tiny random model is registered as the experiment's @champion; every offline run goes
through the CLI on the session's Ray and is checked row by row against the input and
``classify`` on the same model.
"""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
from typer.testing import CliRunner

from lepton_ray.batch_predict import format_table
from lepton_ray.cli import app
from lepton_ray.data.sample import write_reviews_csv
from lepton_ray.tasks import get_task
from tests.conftest import mlflow_store, register_tiny, smoke_config, write_yaml

pytestmark = pytest.mark.slow
runner = CliRunner()
KEY_ENV = "LEPTON_BATCH_PREDICT_TEST_KEY"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_session, tiny_artifact):
    """An experiment whose registered model 'reg' has a @champion (a tiny random BERT)."""
    from lepton_ray.compress.formats import load_model_artifact
    from lepton_ray.registry import versions

    tmp = tmp_path_factory.mktemp("batch")
    (tmp / "mlruns").mkdir()
    store = mlflow_store(tmp / "mlruns")
    version = register_tiny(store, tiny_artifact, 0.5)
    versions.promote(store["uri"], "reg", version, force=True, log=lambda _: None)
    raw = smoke_config(
        tmp,
        write_reviews_csv(tmp / "reviews.csv", n=40, seed=5),
        name="batch",
        tracking={"registered_model_name": "reg"},
        serve={"api_key_env": KEY_ENV},
    )
    assert raw["tracking"]["tracking_uri"] == store["uri"]
    path = write_yaml(tmp / "batch.yaml", raw)
    info = {"tmp": tmp, "path": path, "raw": raw, "version": version}
    return info, load_model_artifact(tiny_artifact)


def classify_texts(loaded, texts):
    model, tokenizer, meta = loaded
    return get_task(meta.task).predict(model, tokenizer, meta, texts)


def check_predictions(out: pd.DataFrame, loaded, version: str) -> None:
    """Labels, probabilities and versions are well formed, and a few rows are exactly what
    ``classify`` answers for their text."""
    labels = list(loaded[2].labels)
    prob_columns = [f"prob_{label}" for label in labels]
    assert [c for c in out.columns if c.startswith("prob_")] == prob_columns
    assert out["id"].is_unique
    assert set(out["model_version"]) == {version}
    answered = out[out["label"].notna()]
    assert len(answered) > 0.9 * len(out)
    # Rows with no prediction are exactly those with no text (the endpoint refuses them).
    blank = out["text"].fillna("").str.strip() == ""
    assert (out["label"].isna() == blank).all()
    assert set(answered["label"]) <= set(labels)
    sums = answered[prob_columns].sum(axis=1)
    assert ((sums - 1.0).abs() < 1e-4).all(), sums.describe()
    best = answered[prob_columns].idxmax(axis=1).str.removeprefix("prob_")
    assert (best == answered["label"]).all()
    for row in answered.itertuples():
        assert row.probability == getattr(row, f"prob_{row.label}")
    sample = answered.head(6)
    expected = classify_texts(loaded, sample["text"].tolist())
    for (_, row), answer in zip(sample.iterrows(), expected, strict=True):
        for label in labels:
            assert row[f"prob_{label}"] == pytest.approx(answer["probabilities"][label], abs=1e-4)
        margin = abs(answer["probabilities"][labels[0]] - answer["probabilities"][labels[1]])
        if margin > 1e-3:  # a near tie may tip either way with another batch's padding
            assert row["label"] == answer["label"]
        assert bool(row["truncated"]) == answer["truncated"]


def test_csv_file_to_parquet(trained):
    info, loaded = trained
    tmp = info["tmp"]
    source = write_reviews_csv(tmp / "new" / "new.csv", n=60, seed=17)
    output = tmp / "preds" / "preds.parquet"
    result = runner.invoke(
        app, ["predict", str(info["path"]), "--input", str(source), "--output", str(output)]
    )
    assert result.exit_code == 0, result.output
    assert f"models:/reg/{info['version']}" in result.output
    assert "rows (100%)" in result.output

    rows = pd.read_csv(source, keep_default_na=False, dtype=str)
    out = pd.read_parquet(output)
    assert len(out) == len(rows) == 60 + 73  # the sample's dirty rows included
    assert list(out.columns[:4]) == ["id", "source", "row", "text"]
    assert set(out["source"]) == {"new.csv"}
    assert (out["id"] == "new.csv:" + out["row"].astype(str)).all()
    assert sorted(out["row"]) == list(range(len(rows)))
    # Every id maps back to its input row: same text (an empty cell reads as null), same label.
    assert (out["text"].fillna("") == rows["review"].iloc[out["row"]].to_numpy()).all()
    assert (out["label_true"] == rows["sentiment"].iloc[out["row"]].to_numpy()).all()
    check_predictions(out, loaded, info["version"])
    assert [p.name for p in output.parent.iterdir()] == ["preds.parquet"]


@pytest.mark.parametrize("malformed", [False, True], ids=["clean", "a-malformed-line"])
def test_jsonl_glob_with_joined_columns_and_an_id_column_to_csv(trained, tmp_path, malformed):
    """Two files by a glob, text_column a list joined by text_join, no label column; a
    malformed line is skipped (data.on_bad_row: skip; Ray reads the files another way)."""
    info, loaded = trained
    folder = tmp_path / "in"
    folder.mkdir()
    texts = {}
    for part, n in (("a", 25), ("b", 30)):
        with (folder / f"{part}.jsonl").open("w") as handle:
            for i in range(n):
                line = {"uid": f"{part}-{i}", "title": f"Review {i}", "body": "It broke."}
                if i % 5 == 0:
                    line["body"] = "The lamp works perfectly, would buy again."
                if i % 7 == 3:
                    del line["body"]  # the title alone is the text then
                handle.write(json.dumps(line) + "\n")
                texts[line["uid"]] = " | ".join(v for k, v in line.items() if k != "uid")
            if part == "b" and malformed:
                handle.write('{"uid": "b-30", "title": "cut off\n')
    data = {"text_column": ["title", "body"], "text_join": " | ", "on_bad_row": "skip"}
    raw = {**info["raw"], "data": {**info["raw"]["data"], **data}}
    config = write_yaml(tmp_path / "jsonl.yaml", raw)
    output = tmp_path / "out" / "preds.csv"
    argv = ["predict", str(config), "--input", str(folder / "*.jsonl"), "--output", str(output)]
    argv += ["--model", f"reg/{info['version']}", "--id-column", "uid", "--batch-size", "8"]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert ("1 malformed rows skipped" in result.output) == malformed

    out = pd.read_csv(output, keep_default_na=False, dtype={"row": int, "model_version": str})
    assert len(out) == 55 and "label_true" not in out.columns
    assert set(out["source"]) == {"a.jsonl", "b.jsonl"}
    # The id column is the input's; source and row still say where each row came from.
    assert (out["id"] == out["source"].str[0] + "-" + out["row"].astype(str)).all()
    assert (out["text"] == out["id"].map(texts)).all()
    check_predictions(out, loaded, info["version"])


def test_text_mode_prints_a_table_or_json_lines_and_sends_the_key(trained, monkeypatch):
    """The endpoint is stood in for by ``classify`` on the same model (no server here)."""
    info, loaded = trained
    calls = []

    def fake_predict(base_url, texts, timeout=60.0, key=None):
        calls.append((base_url, list(texts), key))
        return classify_texts(loaded, texts)

    monkeypatch.setattr("lepton_ray.serve.client.predict", fake_predict)
    monkeypatch.setenv(KEY_ENV, "s3cret")
    texts = ["The lamp works perfectly.", "It broke   after\ntwo days."]
    result = runner.invoke(app, ["predict", str(info["path"]), *texts])
    assert result.exit_code == 0, result.output
    assert calls[-1][1:] == (texts, "s3cret")
    lines = result.stdout.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == ["text", "label", "probability", "truncated"]
    expected = classify_texts(loaded, texts)
    for line, text, answer in zip(lines[1:], texts, expected, strict=True):
        shown, label, probability, truncated = re.split(r"\s{2,}", line)
        assert shown == " ".join(text.split()) and label == answer["label"]
        assert float(probability) == pytest.approx(answer["probabilities"][label], abs=1e-4)
        assert truncated == "no"

    result = runner.invoke(app, ["predict", str(info["path"]), "--json", *texts])
    assert result.exit_code == 0, result.output
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o["text"] for o in objects] == texts
    assert [o["label"] for o in objects] == [a["label"] for a in expected]
    assert all(set(o) >= {"label", "probabilities", "truncated"} for o in objects)


def test_format_table_cuts_long_texts():
    answers = [
        {"label": "positive", "probabilities": {"positive": 0.91234, "negative": 0.08766}},
        {"label": "neg", "probabilities": {"pos": 0.4, "neg": 0.6}, "truncated": True},
    ]
    lines = format_table(
        ["x" * 100, "short\ttext"], answers, get_task("sequence_classification")
    ).splitlines()
    assert len({len(re.split(r"\s{2,}", line)) for line in lines}) == 1
    first, second = (re.split(r"\s{2,}", line) for line in lines[1:])
    assert first == ["x" * 57 + "...", "positive", "0.9123", "no"]
    assert second == ["short text", "neg", "0.6000", "yes"]


@pytest.mark.parametrize(
    "case, needle",
    [
        ("missing file", "no such file"),
        ("glob without a match", "no such file"),
        ("unknown text column", "data.text_column 'nope' is not a column of"),
        ("malformed row", "malformed row on line 3"),
        ("unknown version", "has no version 99"),
        ("malformed model spec", "model must look like NAME"),
        ("output suffix", "cannot write '.xlsx'"),
        ("texts and --input", "not both"),
        ("--input without --output", "--input needs --output"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_output(trained, tmp_path, case, needle):
    info, _ = trained
    good = write_reviews_csv(tmp_path / "good.csv", n=40, seed=3)
    bad = tmp_path / "bad.csv"
    bad.write_text("review,sentiment\nfine,positive\ntoo,many,fields\n")
    output = tmp_path / "out" / "preds.parquet"
    args = {
        "missing file": ["--input", str(tmp_path / "missing.csv")],
        "glob without a match": ["--input", str(tmp_path / "nothing-*.csv")],
        "unknown text column": ["--input", str(good), "--set", "data.text_column=nope"],
        "malformed row": ["--input", str(bad)],
        "unknown version": ["--input", str(good), "--model", "reg/99"],
        "malformed model spec": ["--input", str(good), "--model", "reg@"],
        "output suffix": ["--input", str(good), "--output", str(tmp_path / "out" / "p.xlsx")],
        "texts and --input": ["some text", "--input", str(good)],
        "--input without --output": ["--input", str(good)],
    }[case]
    if "--output" not in args and case != "--input without --output":
        args += ["--output", str(output)]
    result = runner.invoke(app, ["predict", str(info["path"]), *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], lines
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
