"""The data stage end to end on small, deliberately dirty files: every row accounted for,
user-given splits, conflicts, contamination, near-duplicates, augmentation, caching and the
MLflow data report."""

from __future__ import annotations

import csv
import json
import random

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from lepton_ray.cli import app
from lepton_ray.config import validate_experiment
from lepton_ray.data.preprocess import run_preprocess
from tests.conftest import smoke_config, write_yaml

pytestmark = pytest.mark.usefixtures("ray_session")
runner = CliRunner()

WORDS = [
    "the",
    "a",
    "film",
    "movie",
    "plot",
    "actor",
    "scene",
    "story",
    "music",
    "camera",
    "script",
    "cast",
    "director",
    "ending",
    "dialogue",
    "pace",
    "humour",
    "twist",
    "score",
    "light",
    "colour",
    "voice",
    "moment",
    "character",
    "world",
]
GOOD = ["great", "wonderful", "moving", "brilliant", "charming", "superb", "delightful"]
BAD = ["dull", "boring", "awful", "clumsy", "tedious", "weak", "lifeless"]


def _sentence(rng: random.Random, label: str) -> str:
    words = rng.sample(WORDS, 9) + [rng.choice(GOOD if label == "pos" else BAD)]
    rng.shuffle(words)
    return " ".join(words)


def _dirty_rows(seed: int = 0) -> tuple[list[dict], dict[str, int]]:
    """Rows with every kind of problem, and how many of each were planted."""
    rng = random.Random(seed)
    rows = [{"review": _sentence(rng, lab), "sentiment": lab} for lab in ["pos", "neg"] * 150]
    planted = {"duplicate": 0, "conflicting_label": 0, "empty_text": 0, "too_long": 0}
    for row in rows[:10]:  # exact copies, once normalised (case kept, spaces/HTML differ)
        rows.append({"review": "  " + row["review"].replace(" ", "   ") + " ", **_lab(row)})
        planted["duplicate"] += 1
    for row in rows[10:14]:  # same text, the other label: all copies go
        rows.append(
            {"review": row["review"], "sentiment": "neg" if row["sentiment"] == "pos" else "pos"}
        )
        planted["conflicting_label"] += 2
    rows += [{"review": "   ", "sentiment": "pos"}, {"review": "\u200b", "sentiment": "neg"}]
    planted["empty_text"] += 2
    rows.append({"review": "long " * 200, "sentiment": "pos"})
    planted["too_long"] += 1
    rows.append({"review": "mail me at jo@example.com or see https://x.org/a", "sentiment": "pos"})
    rows.append({"review": "<p>a <b>bold</b> film &amp; more</p>", "sentiment": "pos"})
    rng.shuffle(rows)
    return rows, planted


def _lab(row: dict) -> dict:
    return {"sentiment": row["sentiment"]}


def _write_csv(path, rows):
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _config(tmp_path, data_path, **data):
    raw = smoke_config(
        tmp_path, data_path, data={"split": {"validation": 0.2, "test": 0.2}, **data}
    )
    return validate_experiment(raw, "test")


def test_every_row_is_kept_or_dropped_with_a_reason(tmp_path):
    rows, planted = _dirty_rows()
    path = _write_csv(tmp_path / "dirty.csv", rows)
    cfg = _config(
        tmp_path,
        path,
        clean={"max_chars": 400, "strip_html": True, "mask_pii": ["email", "url"]},
        dedup={"exact": True, "conflicts": "drop", "near": {"enabled": True, "threshold": 0.9}},
        augment={"enabled": True, "copies": 1, "deletion_rate": 0.2, "swap_rate": 0.2},
    )
    manifest = run_preprocess(cfg, log=lambda _: None)
    dropped = manifest["dropped"]
    # The identity: rows read = kept + dropped, and the written rows = kept + augmented.
    assert manifest["rows_read"] == len(rows)
    assert manifest["kept"] + sum(dropped.values()) == len(rows)
    assert sum(manifest["splits"].values()) == manifest["kept"] + manifest["augmented"]
    for reason, n in planted.items():
        assert dropped.get(reason, 0) == n, (reason, dropped)
    assert manifest["conflicts"] == {"texts": 4, "rows": 8}
    assert manifest["masked"]["email"] == 1 and manifest["masked"]["url"] == 1
    assert manifest["augmented"] > 0
    out = cfg.data_dir
    frames = {s: pd.read_parquet(out / s) for s in ("train", "validation", "test")}
    for split, frame in frames.items():
        assert len(frame) == manifest["splits"][split]
        assert (frame["length"] == frame["input_ids"].map(len)).all()
        assert frame["augmented"].any() == (split == "train")
    everything = pd.concat(frames.values())
    assert "jo@example.com" not in " ".join(everything["text"])
    assert any("[EMAIL]" in t for t in everything["text"])
    assert "a bold film & more" in set(everything["text"])
    assert not everything.loc[~everything["augmented"]].duplicated(["text"]).any()
    # Label map saved with the data; ids follow it.
    assert manifest["label_map"] == {"neg": 0, "pos": 1}
    for frame in frames.values():
        assert (frame["label_id"] == frame["label"].map(manifest["label_map"])).all()
    lengths = manifest["token_lengths"]
    assert sum(sum(c) for c in lengths["counts"].values()) == sum(manifest["splits"].values())
    sample = [json.loads(line) for line in (out / "dropped_sample.jsonl").read_text().splitlines()]
    assert {s["reason"] for s in sample} >= set(planted)


def test_split_files_and_contamination(tmp_path):
    rng = random.Random(1)
    train = [{"review": _sentence(rng, lab), "sentiment": lab} for lab in ["pos", "neg"] * 80]
    dev = [{"review": _sentence(rng, lab), "sentiment": lab} for lab in ["pos", "neg"] * 15]
    dev += train[:3]  # three dev rows that training also sees
    _write_csv(tmp_path / "train.csv", train)
    _write_csv(tmp_path / "dev.csv", dev)
    for action, expected_dev in (("report", len(dev)), ("remove", len(dev) - 3)):
        cfg = _config(
            tmp_path,
            tmp_path / "train.csv",
            split={
                "validation": 0.1,
                "files": {"test": str(tmp_path / "dev.csv")},
                "contamination": action,
            },
        )
        manifest = run_preprocess(cfg, log=lambda _: None)
        assert manifest["split_source"] == "files"
        assert manifest["contamination"]["test"] == 3
        assert manifest["splits"]["test"] == expected_dev
        assert manifest["dropped"].get("contaminated", 0) == len(dev) - expected_dev
        assert manifest["rows_read"] == len(train) + len(dev)
        test = pd.read_parquet(cfg.data_dir / "test")
        assert set(test["text"]) <= {r["review"] for r in dev}


def test_split_column_and_unknown_values(tmp_path):
    rng = random.Random(2)
    rows = []
    for i in range(200):
        lab = "pos" if i % 2 else "neg"
        rows.append(
            {
                "review": _sentence(rng, lab),
                "sentiment": lab,
                "part": ["train", "dev", "TEST", "Train"][i % 4],
            }
        )
    rows.append({"review": "an orphan row", "sentiment": "pos", "part": "holdout"})
    path = _write_csv(tmp_path / "parts.csv", rows)
    cfg = _config(tmp_path, path, split={"column": "part"})
    manifest = run_preprocess(cfg, log=lambda _: None)
    assert manifest["splits"] == {"train": 100, "validation": 50, "test": 50}
    assert manifest["dropped"] == {"unknown_split": 1}
    cfg = _config(tmp_path, path, split={"column": "part", "names": {"holdout": "test"}})
    assert run_preprocess(cfg, log=lambda _: None)["splits"]["test"] == 51


def test_same_fingerprint_reuses_shards_and_a_change_recomputes(tmp_path):
    rows, _ = _dirty_rows(3)
    path = _write_csv(tmp_path / "d.csv", rows)
    cfg = _config(tmp_path, path)
    first = run_preprocess(cfg, log=lambda _: None)
    marker = cfg.data_dir / "train" / "marker"
    marker.write_text("")
    second = run_preprocess(cfg, log=lambda _: None)
    assert second["reused"] and second["fingerprint"] == first["fingerprint"]
    assert marker.exists()  # nothing was rewritten
    forced = run_preprocess(cfg, log=lambda _: None, force=True)
    assert not forced["reused"] and not marker.exists()
    changed = _config(tmp_path, path, clean={"lowercase": True})
    third = run_preprocess(changed, log=lambda _: None)
    assert not third["reused"] and third["fingerprint"] != first["fingerprint"]
    rows.append({"review": "one more row for the file", "sentiment": "pos"})
    _write_csv(path, rows)
    assert run_preprocess(changed, log=lambda _: None)["fingerprint"] != third["fingerprint"]


def test_headerless_news_csv_from_the_cli_with_report(tmp_path):
    """The issue's 'done when': title + description columns, no header, labels 1..4."""
    rng = random.Random(4)
    topics = {1: "world", 2: "sports", 3: "business", 4: "science"}
    path = tmp_path / "news.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        for i in range(240):
            label = 1 + i % 4
            title = f"{topics[label].title()} news, item {i}"
            body = f'"{topics[label]}" ' + " ".join(rng.sample(WORDS, 8))
            writer.writerow([label, title, body])
    raw = smoke_config(
        tmp_path,
        path,
        data={
            "header": False,
            "column_names": ["class", "title", "description"],
            "text_column": ["title", "description"],
            "text_join": " - ",
            "label_column": "class",
            "split": {"validation": 0.15, "test": 0.15},
        },
    )
    config = write_yaml(tmp_path / "news.yaml", raw)
    result = runner.invoke(app, ["preprocess", str(config)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "storage" / "smoke" / "data"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["labels"] == ["1", "2", "3", "4"]
    assert manifest["rows_read"] == 240 and manifest["kept"] == 240
    assert "read = kept + dropped" in result.output or "240" in result.output
    train = pd.read_parquet(out / "train")
    assert train["text"].str.contains(" - ").all()
    assert train["text"].str.contains('"', regex=False).all()  # quoted quotes survive
    client = MlflowClient(raw["tracking"]["tracking_uri"])
    exp = client.get_experiment_by_name("smoke")
    (run,) = client.search_runs([exp.experiment_id], "tags.`lepton.stage` = 'preprocess'")
    names = {a.path for a in client.list_artifacts(run.info.run_id, "data")}
    assert {"data/manifest.json", "data/label_distribution.png", "data/token_lengths.png"} <= names
    assert run.data.metrics["data_rows_read"] == 240


def _cased_rows(seed: int, email: bool) -> list[dict]:
    """Cased reviews, some with HTML, every one with an e-mail address when ``email``."""
    rng = random.Random(seed)
    rows = []
    for i, lab in enumerate(["pos", "neg"] * 100):
        words = _sentence(rng, lab).split()
        text = " ".join(w.title() if j % 2 else w.upper() for j, w in enumerate(words))
        if i % 3 == 0:
            text = f"<p>{text} <b>Row {i}</b> &amp; More</p>"
        if email:
            text += f" Write To Jo.{i}@Example.COM"
        rows.append({"review": f"  {text} ", "sentiment": lab})
    return rows


def test_evaluation_splits_keep_the_raw_text_unless_pii_is_masked(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lepton_ray.text import clean_texts

    rows = _cased_rows(5, email=False)
    originals = {r["review"] for r in rows}
    clean = {"lowercase": True, "strip_html": True}
    cfg = _config(tmp_path, _write_csv(tmp_path / "cased.csv", rows), clean=clean)
    manifest = run_preprocess(cfg, log=lambda _: None)
    assert manifest["raw_eval_text"] is True and manifest["version"] >= 4
    train = pd.read_parquet(cfg.data_dir / "train")
    assert "raw_text" not in train.columns
    cleaning = {"unicode_form": "NFKC", **clean}
    for split in ("validation", "test"):
        frame = pd.read_parquet(cfg.data_dir / split)
        assert len(frame) == manifest["splits"][split] > 0
        assert set(frame["raw_text"]) <= originals  # the source's text, spaces and all
        assert (frame["text"] == frame["text"].str.lower()).all()
        assert (frame["raw_text"] != frame["raw_text"].str.lower()).all()  # still cased
        assert frame["raw_text"].str.contains("<p>").any()
        # Cleaning the raw text as the data stage does gives the written text back.
        assert clean_texts(frame["raw_text"].tolist(), cleaning) == frame["text"].tolist()

    rows = _cased_rows(6, email=True)
    logged = []
    masked = _config(
        tmp_path,
        _write_csv(tmp_path / "mails.csv", rows),
        clean={**clean, "mask_pii": ["email"]},
    )
    manifest = run_preprocess(masked, log=logged.append)
    assert manifest["raw_eval_text"] is False
    assert manifest["masked"]["email"] == len(rows)
    assert any("mask_pii" in line and "raw_text" in line for line in logged), logged
    texts = []
    for path in sorted(masked.data_dir.rglob("*")):
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            assert "raw_text" not in table.column_names, path
            for name in table.column_names:
                kind = table.schema.field(name).type
                if pa.types.is_string(kind) or pa.types.is_large_string(kind):
                    texts += [str(v) for v in table.column(name).to_pylist()]
        elif path.is_file():
            texts.append(path.read_text())
    assert any("[EMAIL]" in t for t in texts)
    assert not any("@" in t or "example.com" in t.lower() for t in texts)
