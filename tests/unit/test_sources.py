"""data.* source keys: paths, globs, URIs, headerless files, hf datasets, joined text."""

from __future__ import annotations

from pathlib import Path

import pytest

from lepton_ray.config import DataConfig, validate_experiment
from lepton_ray.errors import ConfigError
from tests.conftest import ROOT


def experiment(**data) -> dict:
    return {"name": "t", "data": data}


def csv_file(folder: Path, name: str = "d.csv") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("text,label\na,0\nb,1\n")
    return path


def test_relative_path_and_glob_become_absolute(tmp_path, monkeypatch):
    csv_file(tmp_path / "data", "a.csv")
    csv_file(tmp_path / "data", "b.csv")
    monkeypatch.chdir(tmp_path)
    cfg = validate_experiment(experiment(path="data/a.csv")).data
    assert cfg.path == tmp_path / "data" / "a.csv"
    cfg = validate_experiment(experiment(path="data/*.csv")).data
    assert cfg.path == tmp_path / "data" / "*.csv"
    assert cfg.source_name == str(tmp_path / "data" / "*.csv")


def test_glob_matching_nothing_names_it(tmp_path):
    csv_file(tmp_path)
    with pytest.raises(ConfigError, match=r"data.path: no file matches the glob .*\*\.tsv"):
        validate_experiment(experiment(path=str(tmp_path / "*.tsv")))


def test_missing_file_and_empty_folder(tmp_path):
    with pytest.raises(ConfigError, match="data.path: data file not found: .*nope.csv"):
        validate_experiment(experiment(path=str(tmp_path / "nope.csv")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no CSV/TSV/JSONL/Parquet files"):
        validate_experiment(experiment(path=str(tmp_path / "empty")))


@pytest.mark.parametrize(
    "uri", ["s3://bucket/news/train.csv", "gs://bucket/news/*.parquet", "local:///tmp/x.csv"]
)
def test_uri_is_kept_as_typed(uri):
    cfg = validate_experiment(experiment(path=uri)).data
    assert cfg.path == uri and isinstance(cfg.path, str)
    # A dump and reload (Tune trials, the logged config) keeps it a URI.
    assert DataConfig.model_validate(cfg.model_dump(mode="json")).path == uri


def test_local_path_survives_dump_and_reload(tmp_path):
    cfg = validate_experiment(experiment(path=str(csv_file(tmp_path)))).data
    again = DataConfig.model_validate(cfg.model_dump(mode="json"))
    assert isinstance(again.path, Path) and again.path == cfg.path


def test_headerless_needs_column_names(tmp_path):
    path = str(csv_file(tmp_path))
    with pytest.raises(ConfigError, match="data.header: false needs data.column_names"):
        validate_experiment(experiment(path=path, header=False))
    with pytest.raises(ConfigError, match="set data.header: false"):
        validate_experiment(experiment(path=path, column_names=["text", "label"]))
    cfg = validate_experiment(
        experiment(
            path=path,
            header=False,
            column_names=["title", "body", "y"],
            text_column=["title", "body"],
            label_column="y",
        )
    ).data
    assert cfg.text_columns == ["title", "body"] and cfg.text_join == " "


def test_column_names_must_list_the_text_and_label_columns(tmp_path):
    with pytest.raises(ConfigError, match=r"name \['body'\], which data.column_names"):
        validate_experiment(
            experiment(
                path=str(csv_file(tmp_path)),
                header=False,
                column_names=["title", "y"],
                text_column=["title", "body"],
                label_column="y",
            )
        )


def test_exactly_one_of_path_and_hf(tmp_path):
    with pytest.raises(ConfigError, match="give exactly one of data.path .* and data.hf"):
        validate_experiment(experiment())
    with pytest.raises(ConfigError, match="give exactly one of data.path .* and data.hf"):
        validate_experiment(experiment(path=str(csv_file(tmp_path)), hf={"name": "ag_news"}))


def test_hf_source_defaults_and_absolute_data_files(tmp_path, monkeypatch):
    csv_file(tmp_path)
    monkeypatch.chdir(tmp_path)
    cfg = validate_experiment(experiment(hf={"name": "ag_news"})).data
    assert (cfg.hf.name, cfg.hf.config, cfg.hf.split, cfg.hf.data_files) == (
        "ag_news",
        None,
        "train",
        None,
    )
    assert cfg.path is None and cfg.source_name == "hf:ag_news[train]"
    cfg = validate_experiment(
        experiment(hf={"name": "csv", "data_files": {"train": "d.csv"}, "split": "train[:1]"})
    ).data
    assert cfg.hf.data_files == {"train": str(tmp_path / "d.csv")}
    with pytest.raises(ConfigError, match="drop them for data.hf"):
        validate_experiment(experiment(hf={"name": "ag_news"}, format="csv"))
    with pytest.raises(ConfigError, match="unknown key 'data.hf.splt'"):
        validate_experiment(experiment(hf={"name": "ag_news", "splt": "test"}))


def test_text_column_list_and_bad_row_policy(tmp_path):
    path = str(csv_file(tmp_path))
    cfg = validate_experiment(experiment(path=path, text_column="text")).data
    assert cfg.text_columns == ["text"] and cfg.on_bad_row == "error" and cfg.header is True
    cfg = validate_experiment(
        experiment(path=path, text_column=["a", "b"], text_join=" | ", on_bad_row="skip")
    ).data
    assert cfg.text_columns == ["a", "b"] and cfg.text_join == " | "
    with pytest.raises(ConfigError, match="data.text_column: give a column name"):
        validate_experiment(experiment(path=path, text_column=[]))
    with pytest.raises(ConfigError, match="data.text_column: lists a column twice"):
        validate_experiment(experiment(path=path, text_column=["a", "a"]))
    with pytest.raises(ConfigError, match="data.on_bad_row"):
        validate_experiment(experiment(path=path, on_bad_row="ignore"))


def test_shipped_headerless_news_config_validates(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = validate_experiment(
        experiment(
            path="experiments/data/news_headerless.csv",
            header=False,
            column_names=["title", "description", "label"],
            text_column=["title", "description"],
        )
    ).data
    assert cfg.path == ROOT / "experiments" / "data" / "news_headerless.csv"
