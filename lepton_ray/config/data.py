"""The ``data`` section: where the rows come from (files, a URI or a Hugging Face dataset)
and how they are read, cleaned, deduplicated, split and augmented."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from lepton_ray.config.base import Section, checking_files
from lepton_ray.config.chat import ChatConfig

SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}
"""Values of a split column that name each split (case-insensitive); extend with split.names."""


class SplitConfig(Section):
    validation: float = Field(
        0.1,
        lt=1.0,
        description="Fraction of rows for validation (above 0: epochs, trials and the "
        "compression gate are judged on it). Unused when validation comes from files or a "
        "split column.",
    )
    test: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Fraction of rows for test. Unused when test comes from files or a split column.",
    )
    seed: int = Field(42, description="Seed of the stratified split; same seed, same split.")
    files: dict[Literal["validation", "test"], Path | str] = Field(
        default_factory=dict,
        description="Splits the data already has as separate files (same columns and format as "
        "data.path), e.g. {validation: dev.tsv, test: test.tsv}. data.path then feeds train "
        "and any split not listed here, cut by its fraction.",
    )
    column: str | None = Field(
        None,
        description="A column of data.path naming each row's split (train/validation/test; "
        "also dev, val, valid). Fractions are then unused.",
    )
    names: dict[str, Literal["train", "validation", "test"]] = Field(
        default_factory=dict,
        description="More split-column values, e.g. {holdout: test}. Rows with a value not "
        "named here or in the defaults are dropped as 'unknown_split'.",
    )
    contamination: Literal["report", "remove"] = Field(
        "report",
        description="Validation/test rows whose cleaned text also appears in train: report "
        "them, or remove them from the evaluation split.",
    )

    @field_validator("validation")
    @classmethod
    def _validation_required(cls, value: float) -> float:
        if value <= 0:
            raise ValueError(
                "must be above 0: the best epoch, the best trial and the compression check "
                "are all chosen on the validation split"
            )
        return value

    @field_validator("files")
    @classmethod
    def _split_files_exist(
        cls, value: dict[str, Path | str], info: ValidationInfo
    ) -> dict[str, Path | str]:
        out: dict[str, Path | str] = {}
        for split, path in value.items():
            if isinstance(path, str) and "://" in path:
                out[split] = path
                continue
            path = Path(path).expanduser().resolve()
            if checking_files(info) and not path.exists():
                raise ValueError(f"{split} file not found: {path}")
            out[split] = path
        return out

    @model_validator(mode="after")
    def _fractions_leave_train(self) -> SplitConfig:
        if self.column is not None and self.files:
            raise ValueError("give data.split.column or data.split.files, not both")
        if self.hashed_fraction() >= 1.0:
            raise ValueError("data.split.validation + data.split.test must be below 1.0")
        return self

    def hashed_fraction(self) -> float:
        """The share of data.path cut off for validation and test by the hash split."""
        if self.column is not None:
            return 0.0
        return sum(getattr(self, s) for s in ("validation", "test") if s not in self.files)

    @property
    def source(self) -> str:
        """How rows get their split: 'hash' (fractions), 'files' or 'column'."""
        return "column" if self.column else "files" if self.files else "hash"

    def split_names(self) -> dict[str, str]:
        return {**SPLIT_NAMES, **{k.lower(): v for k, v in self.names.items()}}


class NearDupConfig(Section):
    enabled: bool = Field(False, description="Drop near-duplicates found by MinHash LSH.")
    threshold: float = Field(
        0.8,
        gt=0.0,
        le=1.0,
        description="Estimated Jaccard similarity of word n-grams at or "
        "above which two rows are near-duplicates.",
    )
    num_perm: int = Field(64, ge=16, le=512, description="MinHash permutations per row.")
    ngram: int = Field(3, ge=1, le=10, description="Words per shingle.")


class DedupConfig(Section):
    exact: bool = Field(True, description="Drop exact duplicates of the cleaned text in a split.")
    conflicts: Literal["drop", "majority", "keep"] = Field(
        "drop",
        description="Copies of one cleaned text with different labels: drop them all, keep "
        "the majority label (ties dropped), or keep every label.",
    )
    near: NearDupConfig = Field(default_factory=NearDupConfig)


class AugmentConfig(Section):
    enabled: bool = Field(False, description="Add augmented copies of training rows.")
    copies: int = Field(1, ge=1, le=10, description="Augmented copies per training row.")
    deletion_rate: float = Field(
        0.1, ge=0.0, lt=1.0, description="Chance that each word is deleted."
    )
    swap_rate: float = Field(
        0.1, ge=0.0, le=1.0, description="Word swaps per word (rounded per text)."
    )
    seed: int = Field(0, description="Seed of the augmentation; same seed, same rows.")


class CleanConfig(Section):
    unicode_form: Literal["NFC", "NFKC", "NFD", "NFKD", "none"] = Field(
        "NFKC", description="Unicode normalisation applied to every text."
    )
    lowercase: bool = Field(False, description="Lowercase texts (uncased models do this anyway).")
    min_chars: int = Field(1, ge=1, description="Rows whose cleaned text is shorter are dropped.")
    max_chars: int | None = Field(
        None, ge=1, description="Rows whose cleaned text is longer are dropped ('too_long')."
    )
    strip_html: bool = Field(False, description="Remove HTML tags and unescape entities.")
    mask_pii: list[Literal["email", "url", "phone"]] = Field(
        default_factory=list,
        description="Personal data to mask as [EMAIL], [URL], [PHONE] (counted in the manifest).",
    )


class HFSource(Section):
    """Arguments of ``datasets.load_dataset`` (or a folder written by ``save_to_disk``)."""

    name: str = Field(
        description="Dataset on the Hugging Face hub ('ag_news'), a packaged builder ('csv', "
        "'json', 'parquet') with data_files, or a folder written by Dataset.save_to_disk."
    )
    config: str | None = Field(
        None, description="Dataset configuration (load_dataset's second argument)."
    )
    split: str = Field("train", description="Split to read; slices such as 'train[:10%]' work.")
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(
        None, description="Files for a packaged builder (load_dataset's data_files)."
    )

    @field_validator("name")
    @classmethod
    def _absolute_folder(cls, value: str) -> str:
        # A local folder must survive a change of directory (Ray workers, `lepton-ray run`).
        if "://" not in value and Path(value).expanduser().is_dir():
            return str(Path(value).expanduser().resolve())
        return value

    @field_validator("data_files")
    @classmethod
    def _absolute_data_files(cls, value: Any) -> Any:
        def absolute(item: str) -> str:
            return item if "://" in item else str(Path(item).expanduser().resolve())

        if isinstance(value, str):
            return absolute(value)
        if isinstance(value, list):
            return [absolute(v) for v in value]
        if isinstance(value, dict):
            return {
                k: absolute(v) if isinstance(v, str) else [absolute(x) for x in v]
                for k, v in value.items()
            }
        return value


DATA_SUFFIXES = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
"""File suffix -> format: the files read from a folder, and what data.format: auto picks."""


class DataConfig(Section):
    path: Path | str | None = Field(
        None,
        description="Local file, folder or glob (data/*.csv) of CSV, TSV, JSONL or Parquet, or "
        "a storage URI that Ray Data reads (s3://, gs://, ...). Give exactly one of path and hf.",
    )
    hf: HFSource | None = Field(
        None, description="A Hugging Face `datasets` split instead of data.path."
    )
    format: Literal["auto", "csv", "tsv", "jsonl", "parquet"] = Field(
        "auto", description="File format; 'auto' picks it from the file suffix."
    )
    header: bool = Field(
        True, description="CSV/TSV files start with a header row; false needs column_names."
    )
    column_names: list[str] | None = Field(
        None, min_length=1, description="Names of the columns of headerless CSV/TSV files."
    )
    text_column: str | list[str] = Field(
        "text", description="Column holding the input text, or a list of columns to join."
    )
    text_join: str = Field(
        " ", description="Separator between the columns of a text_column list (blanks skipped)."
    )
    label_column: str = Field("label", description="Column holding the class label.")
    on_bad_row: Literal["skip", "error"] = Field(
        "error",
        description="A malformed row (wrong field count, a JSONL line that is not an object) "
        "stops the run ('error', naming file and line) or is skipped and counted ('skip').",
    )
    max_rows: int | None = Field(None, ge=1, description="Read at most this many rows.")
    clean: CleanConfig = Field(default_factory=CleanConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    cache: bool = Field(
        True,
        description="Reuse shards already written for the same inputs and preprocessing "
        "config (same fingerprint) instead of recomputing them.",
    )
    max_length: int = Field(128, ge=8, le=4096, description="Tokens per text after truncation.")
    chat: ChatConfig = Field(
        default_factory=ChatConfig,
        description="task causal_lm: the examples' format, chat template and loss mask.",
    )
    packing: bool = Field(
        False,
        description="task causal_lm: pack training examples into rows of max_length tokens; "
        "positions restart and no token attends across an example (a block-diagonal mask, "
        "or flash-attention's variable-length path). Applied when batching, so a sweep may "
        "search it without tokenizing again.",
    )

    @field_validator("path", mode="before")
    @classmethod
    def _local_path_or_uri(cls, value: Any) -> Any:
        # URIs go to Ray Data as typed; local paths become absolute (Ray workers run elsewhere).
        if value is None or (isinstance(value, str) and "://" in value):
            return value
        if isinstance(value, (str, os.PathLike)):
            return Path(value).expanduser().resolve()
        return value

    @field_validator("path")
    @classmethod
    def _path_exists(cls, value: Path | str | None, info: ValidationInfo) -> Path | str | None:
        if not isinstance(value, Path) or not checking_files(info):
            return value
        if any(char in str(value) for char in "*?["):
            import glob

            if not any(Path(p).exists() for p in glob.iglob(str(value), recursive=True)):
                raise ValueError(f"no file matches the glob {value}")
        elif not value.exists():
            raise ValueError(f"data file not found: {value}")
        elif value.is_dir() and not any(
            p.suffix.lower() in DATA_SUFFIXES for p in value.rglob("*") if p.is_file()
        ):
            raise ValueError(f"folder {value} holds no CSV/TSV/JSONL/Parquet files")
        return value

    @field_validator("dedup", mode="before")
    @classmethod
    def _dedup_switch(cls, value: Any) -> Any:
        return {"exact": value} if isinstance(value, bool) else value

    @field_validator("text_column")
    @classmethod
    def _text_columns_given(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list):
            if not value:
                raise ValueError("give a column name or a non-empty list of them")
            if len(set(value)) != len(value):
                raise ValueError(f"lists a column twice: {value}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if (self.path is None) == (self.hf is None):
            raise ValueError(
                "give exactly one of data.path (files or a URI) and data.hf (a Hugging Face "
                "dataset)"
            )
        if self.hf is not None and (
            self.format != "auto" or not self.header or self.column_names is not None
        ):
            raise ValueError(
                "data.format, data.header and data.column_names describe data.path files; "
                "drop them for data.hf"
            )
        if not self.header and not self.column_names:
            raise ValueError(
                "data.header: false needs data.column_names, the names of the file's columns "
                "in order (text_column and label_column then name two of them)"
            )
        if self.header and self.column_names is not None:
            raise ValueError(
                "data.column_names names the columns of a file without a header row; set "
                "data.header: false, or drop column_names to use the header's names"
            )
        if self.column_names is not None:
            if self.format in ("jsonl", "parquet"):
                raise ValueError(
                    f"data.header and data.column_names apply to CSV and TSV, not {self.format}"
                )
            if len(set(self.column_names)) != len(self.column_names):
                raise ValueError(f"data.column_names lists a column twice: {self.column_names}")
            missing = [
                c for c in [*self.text_columns, self.label_column] if c not in self.column_names
            ]
            if missing:
                raise ValueError(
                    f"data.text_column/label_column name {missing}, which data.column_names "
                    f"does not list ({', '.join(self.column_names)})"
                )
        split_column = self.split.column
        if split_column is not None:
            if split_column in [*self.text_columns, self.label_column]:
                raise ValueError(
                    f"data.split.column '{split_column}' is also a text or label column"
                )
            if self.column_names is not None and split_column not in self.column_names:
                raise ValueError(
                    f"data.split.column '{split_column}' is not in data.column_names "
                    f"({', '.join(self.column_names)})"
                )
        return self

    @property
    def text_columns(self) -> list[str]:
        """``text_column`` as a list (one or more columns joined with ``text_join``)."""
        return [self.text_column] if isinstance(self.text_column, str) else list(self.text_column)

    @property
    def source_name(self) -> str:
        """The source as a user would name it in a message: the path, URI or hf dataset."""
        if self.hf is not None:
            config = f"/{self.hf.config}" if self.hf.config else ""
            return f"hf:{self.hf.name}{config}[{self.hf.split}]"
        return str(self.path)
