"""read_source on real files through Ray Data: every format, every source kind, every error."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from tests.conftest import ROOT, TEST_RAY_TMP, shared_file

# Before `datasets` is imported anywhere: no hub, and a cache that goes with the session.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", str(TEST_RAY_TMP / "hf-datasets"))

from lepton_ray.config import DataConfig  # noqa: E402
from lepton_ray.data.sources import Source, read_source, source_files  # noqa: E402
from lepton_ray.errors import DataError  # noqa: E402
from lepton_ray.tasks import get_task  # noqa: E402

CLASSIFIER = get_task("sequence_classification")

pytestmark = pytest.mark.usefixtures("ray_session")

NEWS = ROOT / "experiments" / "data" / "news_headerless.csv"


def config(path, **data) -> DataConfig:
    return DataConfig.model_validate({"path": str(path), **data})


def rows(source: Source) -> list[tuple[str | None, str | None]]:
    assert source.ds.columns() == ["text", "label"]
    read = source.ds.take_all()
    # The scan's count is what the data stage checks its tagged rows against.
    assert len(read) == source.n_rows
    return sorted(
        ((r["text"], r["label"]) for r in read),
        key=lambda r: (r[0] is None, r[0] or ""),
    )


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------ formats
def test_headerless_news_joins_title_and_description():
    cfg = config(
        NEWS,
        header=False,
        column_names=["title", "description", "label"],
        text_column=["title", "description"],
    )
    source = read_source(cfg, CLASSIFIER)
    with NEWS.open(newline="", encoding="utf-8") as fh:
        expected = sorted(((f"{t} {d}", y) for t, d, y in csv.reader(fh)), key=lambda r: r[0])
    assert len(expected) == 40
    assert rows(source) == expected
    assert {label for _, label in expected} == {"1", "2", "3", "4"}
    assert any("," in t and '"' in t for t, _ in expected)  # the file tests what it claims
    assert (source.n_rows, source.n_bad, source.bad_rows) == (40, 0, [])
    assert len(source.fingerprint) == 16


def test_quoted_fields_keep_commas_quotes_and_newlines(tmp_path):
    path = write(
        tmp_path / "q.csv",
        'text,label\n"a, b",x\n"she said ""hi""",y\n"line one\nline two",x\nplain,y\n',
    )
    assert rows(read_source(config(path), CLASSIFIER)) == [
        ("a, b", "x"),
        ("line one\nline two", "x"),
        ("plain", "y"),
        ('she said "hi"', "y"),
    ]


def test_join_skips_missing_parts_and_integer_labels_become_strings(tmp_path):
    path = write(tmp_path / "j.csv", "t,d,y\nTitle,,1\n,Body,2\nA,B,3\n,,4\n")
    cfg = config(path, text_column=["t", "d"], label_column="y", text_join=" - ")
    assert rows(read_source(cfg, CLASSIFIER)) == [
        ("A - B", "3"),
        ("Body", "2"),
        ("Title", "1"),
        (None, "4"),
    ]


def test_glob_over_two_files_reads_both(tmp_path):
    write(tmp_path / "part-1.csv", "text,label\na,0\nb,1\n")
    write(tmp_path / "part-2.csv", "text,label\nc,0\n")
    write(tmp_path / "notes.txt", "not data\n")
    source = read_source(config(tmp_path / "part-*.csv"), CLASSIFIER)
    assert rows(source) == [("a", "0"), ("b", "1"), ("c", "0")]
    assert source.n_rows == 3


def test_folder_and_local_uri(tmp_path):
    write(tmp_path / "a.csv", "text,label\na,0\n")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "b.csv", "text,label\nb,1\n")
    assert rows(read_source(config(tmp_path), CLASSIFIER)) == [("a", "0"), ("b", "1")]
    cfg = config(f"local://{tmp_path / 'a.csv'}")
    assert cfg.path == f"local://{tmp_path / 'a.csv'}"
    with pytest.warns(Warning, match="local://"):
        assert rows(read_source(cfg, CLASSIFIER)) == [("a", "0")]


def test_uri_glob_lists_like_a_shell_and_reads(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "a.csv", "text,label\na,0\n")
    write(tmp_path / "sub" / "b.csv", "text,label\nb,1\n")
    uri = f"file://{tmp_path}"
    assert source_files(f"{uri}/*.csv") == [f"{uri}/a.csv"]
    assert source_files(f"{uri}/**/*.csv") == [f"{uri}/a.csv", f"{uri}/sub/b.csv"]
    assert source_files(uri) == [f"{uri}/a.csv", f"{uri}/sub/b.csv"]
    cfg = config(f"{uri}/**/*.csv")
    assert cfg.path == f"{uri}/**/*.csv"
    assert rows(read_source(cfg, CLASSIFIER)) == [("a", "0"), ("b", "1")]


def test_tsv(tmp_path):
    path = write(tmp_path / "d.tsv", 'sentence\tlabel\nit\'s "fine", ok\t1\nbad\t0\n')
    assert rows(read_source(config(path, text_column="sentence"), CLASSIFIER)) == [
        ("bad", "0"),
        ('it\'s "fine", ok', "1"),
    ]


def test_headerless_tsv(tmp_path):
    path = write(tmp_path / "d.tab", "hello there\tpos\nawful\tneg\n")
    cfg = config(path, header=False, column_names=["text", "label"])
    assert rows(read_source(cfg, CLASSIFIER)) == [("awful", "neg"), ("hello there", "pos")]


def test_jsonl_with_integer_labels_and_blank_lines(tmp_path):
    path = write(
        tmp_path / "d.jsonl",
        '{"title": "T1", "body": "B1", "y": 1}\n\n{"title": "T2", "y": 2, "extra": [1]}\n',
    )
    cfg = config(path, text_column=["title", "body"], label_column="y")
    assert rows(read_source(cfg, CLASSIFIER)) == [("T1 B1", "1"), ("T2", "2")]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "label": [3, 4], "other": [0.1, 0.2]}), path)
    source = read_source(config(path), CLASSIFIER)
    assert rows(source) == [("a", "3"), ("b", "4")]
    assert source.n_rows == 2


def test_hf_csv_builder_on_local_files(tmp_path):
    path = write(tmp_path / "hf.csv", 'title,description,label\nA,"b, c",1\nD,e,2\nF,g,1\n')
    cfg = DataConfig.model_validate(
        {
            "hf": {"name": "csv", "data_files": {"train": str(path)}, "split": "train"},
            "text_column": ["title", "description"],
        }
    )
    source = read_source(cfg, CLASSIFIER)
    assert rows(source) == [("A b, c", "1"), ("D e", "2"), ("F g", "1")]
    assert source.n_rows == 3 and len(source.fingerprint) == 16


def test_hf_saved_to_disk_and_from_huggingface(tmp_path, monkeypatch):
    import datasets

    from lepton_ray.data.sources import hf_to_ray

    saved = tmp_path / "saved"
    data = datasets.Dataset.from_dict({"text": ["x", "y"], "label": [0, 1]})
    datasets.DatasetDict({"train": data, "test": data.select([0])}).save_to_disk(str(saved))
    cfg = DataConfig.model_validate({"hf": {"name": str(saved), "split": "test"}})
    assert rows(read_source(cfg, CLASSIFIER)) == [("x", "0")]
    with pytest.raises(DataError, match="data.hf.split 'dev' is not a split .* train, test"):
        read_source(
            DataConfig.model_validate({"hf": {"name": str(saved), "split": "dev"}}), CLASSIFIER
        )
    # The hub path: ray.data.from_huggingface (its hub probe finds nothing for local data).
    monkeypatch.chdir(tmp_path)
    assert sorted(r["text"] for r in hf_to_ray(data, from_hub=True).take_all()) == ["x", "y"]


def test_max_rows_is_the_first_rows_in_file_order_every_run(tmp_path, monkeypatch):
    import ray.data

    # A big file first, then smaller ones, in small blocks read by several tasks: an
    # unordered limit keeps the rows of whichever blocks reach it first.
    monkeypatch.setattr(ray.data.DataContext.get_current(), "target_max_block_size", 1 << 16)
    expected = []
    for index, n in enumerate([50_000] + [5_000] * 8):
        body = [f"file {index} row {i} words" for i in range(n)]
        lines = "".join(f"{text},{i % 2}\n" for i, text in enumerate(body))
        write(tmp_path / f"part-{index}.csv", "text,label\n" + lines)
        expected.extend(body)
    cfg = config(tmp_path, max_rows=40_000)
    for _ in range(3):
        source = read_source(cfg, CLASSIFIER)
        assert source.ds.context.execution_options.preserve_order
        assert [row["text"] for row in source.ds.iter_rows()] == expected[:40_000]
    # The setting is the dataset's own: other Ray Data work in the process keeps its order.
    assert not ray.data.DataContext.get_current().execution_options.preserve_order


def test_local_hf_dataset_puts_only_the_rows_it_reads(tmp_path):
    import datasets

    from lepton_ray.data.sources import hf_to_ray

    saved = tmp_path / "saved"
    texts = [f"row {i}" for i in range(1000)]
    datasets.Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(1000)]}).save_to_disk(
        str(saved)
    )
    ds = hf_to_ray(
        datasets.load_from_disk(str(saved)), from_hub=False, max_rows=250, chunk_rows=100
    )
    # The object store holds the first 250 rows, put 100 at a time; the rest is never read.
    assert (ds.count(), ds.num_blocks()) == (250, 3)
    assert [row["text"] for row in ds.iter_rows()] == texts[:250]
    cfg = DataConfig.model_validate({"hf": {"name": str(saved)}, "max_rows": 250})
    source = read_source(cfg, CLASSIFIER)
    assert source.n_rows == 1000
    assert [row["text"] for row in source.ds.take_all()] == texts[:250]


# ------------------------------------------------------------------------------------- errors
def test_non_utf8_file_names_file_and_line(tmp_path):
    path = write(tmp_path / "latin.csv", "text,label\nok,1\ncaf\xe9 au lait,2\n".encode("latin-1"))
    with pytest.raises(DataError) as err:
        read_source(config(path), CLASSIFIER)
    message = str(err.value)
    assert str(path) in message and "line 3 is not UTF-8" in message and "\n" not in message
    path = write(
        tmp_path / "latin.jsonl", '{"text": "ok", "label": 1}\n{"text": "\xe9"}\n'.encode("latin-1")
    )
    with pytest.raises(DataError, match=r"latin.jsonl: line 2 is not UTF-8"):
        read_source(config(path), CLASSIFIER)


def test_empty_files_say_so(tmp_path):
    for name in ("e.csv", "e.jsonl", "e.tsv"):
        path = write(tmp_path / name, "")
        with pytest.raises(DataError, match=rf"{name}: the file is empty"):
            read_source(config(path), CLASSIFIER)
    headerless = config(write(tmp_path / "h.csv", ""), header=False, column_names=["text", "label"])
    with pytest.raises(DataError, match="h.csv: the file is empty"):
        read_source(headerless, CLASSIFIER)
    with pytest.raises(DataError, match="hold no rows"):
        read_source(config(write(tmp_path / "only_header.csv", "text,label\n")), CLASSIFIER)


def test_missing_column_names_it_and_the_columns_there(tmp_path):
    path = write(tmp_path / "d.csv", "title,label\na,0\n")
    with pytest.raises(DataError) as err:
        read_source(config(path, text_column=["title", "body"]), CLASSIFIER)
    assert str(err.value) == (
        f"data.text_column 'body' is not a column of {path}; its columns are: title, label"
    )


BAD_CSV = (
    "text,label\n"  # line 1
    "good,0\n"  # 2
    '"two\nlines",1\n'  # 3-4
    "too,many,fields\n"  # 5: bad
    "\n"  # 6: blank, not a row
    "fine,1\n"  # 7
    "lonely\n"  # 8: bad
    '"x, y",0\n'  # 9
)


def test_bad_rows_skipped_counted_and_located(tmp_path):
    path = write(tmp_path / "bad.csv", BAD_CSV)
    source = read_source(config(path, on_bad_row="skip"), CLASSIFIER)
    assert rows(source) == [("fine", "1"), ("good", "0"), ("two\nlines", "1"), ("x, y", "0")]
    assert source.n_bad == 2
    assert source.bad_rows == [
        {"file": str(path), "line": 5, "reason": "expected 2 fields, got 3"},
        {"file": str(path), "line": 8, "reason": "expected 2 fields, got 1"},
    ]
    # Rows in the file = rows read + bad rows.
    assert source.ds.count() + source.n_bad == 6 == source.n_rows + source.n_bad


def test_bad_jsonl_lines_skipped_and_counted_over_a_glob(tmp_path):
    write(tmp_path / "a.jsonl", '{"text": "a", "label": 1}\n[1, 2]\n{"text": "b", "label": 2}\n')
    write(tmp_path / "b.jsonl", '{"text": "c", "label": 1}\n{broken\n\n"str"\n')
    source = read_source(config(tmp_path / "*.jsonl", on_bad_row="skip"), CLASSIFIER)
    assert rows(source) == [("a", "1"), ("b", "2"), ("c", "1")]
    assert source.n_bad == 3 and source.ds.count() + source.n_bad == 6
    reasons = {(Path(r["file"]).name, r["line"]): r["reason"] for r in source.bad_rows}
    assert reasons[("a.jsonl", 2)] == "is not a JSON object (a list)"
    assert reasons[("b.jsonl", 2)].startswith("is not valid JSON")
    assert reasons[("b.jsonl", 4)] == "is not a JSON object (a str)"


def test_skipping_jsonl_splits_lines_on_newlines_only(tmp_path):
    # U+2028 is legal inside a JSON string; str.splitlines() would cut the line there.
    path = write(tmp_path / "u.jsonl", '{"text": "a\u2028b", "label": 1}\nnope\n')
    source = read_source(config(path, on_bad_row="skip"), CLASSIFIER)
    assert rows(source) == [("a\u2028b", "1")] and source.n_bad == 1


def test_bad_row_stops_the_run_by_default(tmp_path):
    path = write(tmp_path / "bad.csv", BAD_CSV)
    with pytest.raises(DataError) as err:
        read_source(config(path), CLASSIFIER)
    assert str(err.value).startswith(
        f"data.path {path}: malformed row on line 5: expected 2 fields, got 3"
    )
    path = write(tmp_path / "bad.jsonl", '{"text": "a", "label": 1}\n{"text": \n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 2 is not valid JSON"):
        read_source(config(path), CLASSIFIER)


# ---------------------------------------------------------------------------------- real data
def test_real_trec_tsv():
    cfg = config(shared_file("trec", "train.tsv"), label_column="coarse_label")
    source = read_source(cfg, CLASSIFIER)
    assert source.ds.count() == 5452 == source.n_rows
    assert set(source.ds.unique("label")) == {"ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"}


def test_real_sst2_tsv():
    cfg = config(shared_file("sst2", "train.tsv"), text_column="sentence")
    source = read_source(cfg, CLASSIFIER)
    assert source.ds.count() == 67349 == source.n_rows
    assert set(source.ds.unique("label")) == {"0", "1"}
