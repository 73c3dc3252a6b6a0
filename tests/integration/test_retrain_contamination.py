"""Retraining's evaluation splits hold no text the continued version trained on.

The experiment evaluates on files of its own, so every row of its data trained the
champion. The new data repeats those rows: ``retrain`` drops ``split.files`` and hash-cuts
the new data, so about 40% of the champion's training texts land in the new validation and
test splits, where the gate would score the champion on its own training data.
"""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lepton_ray.config import validate_experiment
from lepton_ray.data.report import data_metrics
from lepton_ray.data.split import split_of, text_key
from lepton_ray.registry.retrain import TAG_TRAINED_ON, prepare_retrain_data, retrain_config
from tests.conftest import smoke_config

pytestmark = pytest.mark.usefixtures("ray_session")


def _rows(stem: str, n: int) -> list[tuple[str, str]]:
    return [
        (
            f"{stem} {i} {'works well' if i % 2 else 'broke at once'}",
            "positive" if i % 2 else "negative",
        )
        for i in range(n)
    ]


def _write(path, rows):
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["review", "sentiment"])
        writer.writerows(rows)
    return path


def _texts(folder) -> set[str]:
    return set(pd.read_parquet(folder, columns=["text"])["text"]) if folder.is_dir() else set()


def test_retrain_removes_texts_the_champion_trained_on_from_evaluation(tmp_path):
    old, fresh = _rows("the old lamp", 300), _rows("a new kettle", 200)
    earlier = fresh[:50]  # trained on by an earlier retrain, named in the version's tags
    files = {s: str(_write(tmp_path / f"{s}.csv", _rows(s, 40))) for s in ("validation", "test")}
    raw = smoke_config(tmp_path, _write(tmp_path / "old.csv", old))
    raw["data"]["split"]["files"] = files  # every row of old.csv trains the champion
    cfg = validate_experiment(raw, "contamination")
    (tmp_path / "from").mkdir()
    new_cfg = retrain_config(
        cfg, str(_write(tmp_path / "new.csv", old + fresh)), tmp_path / "from", tmp_path / "rt"
    )
    earlier_dir = tmp_path / "earlier" / "train"
    earlier_dir.mkdir(parents=True)
    pq.write_table(pa.table({"text": [t for t, _ in earlier]}), earlier_dir / "part-0.parquet")
    source = SimpleNamespace(version="3", tags={TAG_TRAINED_ON: str(earlier_dir)})

    seed = new_cfg.data.split.seed
    split = new_cfg.data.split

    def in_eval(rows):
        return {
            t
            for t, _ in rows
            if split_of(text_key(t, seed), split.validation, split.test) != "train"
        }

    # The case leaks without the check: champion training texts are hashed to evaluation.
    leaked = in_eval(old) | in_eval(earlier)
    assert len(in_eval(old)) > 90 and in_eval(earlier)

    logs: list[str] = []
    manifest, replay_dir, replay_rows, checked = prepare_retrain_data(
        cfg, new_cfg, source, 0.5, log=logs.append
    )
    assert checked == [cfg.data_dir / "train", earlier_dir]
    evaluation = _texts(new_cfg.data_dir / "validation") | _texts(new_cfg.data_dir / "test")
    assert evaluation == in_eval(fresh) - leaked  # every fresh text kept, no trained text
    seen = manifest["seen_in_training"]
    assert seen["validation"] + seen["test"] == len(leaked)
    assert manifest["dropped"]["seen_in_training"] == len(leaked)
    assert data_metrics(manifest)["data_rows_seen_in_training"] == len(leaked)
    assert any(f"removed {len(leaked)} rows of the new evaluation splits" in line for line in logs)
    # The replay sample comes from the checked training split: none of it is evaluated.
    replayed = set(pd.read_parquet(replay_dir / "replay.parquet")["text"])
    assert replay_rows == len(replayed) == 150
    assert replayed <= {t for t, _ in old} and not replayed & evaluation
