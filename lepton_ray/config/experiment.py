"""The whole experiment: ``ExperimentConfig`` (every section, and the checks that span
sections), loaded from YAML with ``--set`` overrides; every error names the key and the file."""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from lepton_ray.config.base import CHECK_FILES, Section
from lepton_ray.config.cluster import ClusterSection
from lepton_ray.config.compress import CompressSection
from lepton_ray.config.data import DataConfig
from lepton_ray.config.model import ModelConfig
from lepton_ray.config.peft import PeftSection
from lepton_ray.config.serve import ServeSection
from lepton_ray.config.space import check_space
from lepton_ray.config.tracking import RegistrySection, TrackingSection
from lepton_ray.config.train import ScalingSection, TrainConfig
from lepton_ray.config.tune import (
    TUNABLE_KEYS,
    TUNABLE_SECTIONS,
    UNTUNABLE_KEYS,
    UNTUNABLE_REASON,
    TuneSection,
)
from lepton_ray.errors import ConfigError
from lepton_ray.runtime.uri import Location, location
from lepton_ray.tasks import TASKS, get_task

Task = Literal[tuple(TASKS)]  # type: ignore[valid-type] - the names of lepton_ray.tasks
"""Tasks the platform trains: one per module of ``lepton_ray.tasks``."""


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
    def _the_task_accepts_it(self) -> ExperimentConfig:
        task = get_task(self.task)
        if self.tune.metric not in task.metrics:
            raise ValueError(
                f"tune.metric: unknown metric '{self.tune.metric}' for task {self.task}; "
                f"choose one of {sorted(task.metrics)}"
            )
        problems = task.validate(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _the_peft_method_fits(self) -> ExperimentConfig:
        from lepton_ray.config.peft import peft_problems

        problems = peft_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _gate_metric_is_measured_on_every_candidate(self) -> ExperimentConfig:
        # The gate and compress.max_drop score candidates on validation rows; a training
        # loss is not measured there (nor on a compressed model), so no later candidate
        # could ever be compared.
        if self.tune.objective == "served" and not self.tune.metric.startswith("val_"):
            raise ValueError(
                f"tune.objective served scores served models on validation rows, where "
                f"tune.metric {self.tune.metric} is not measured; choose a val_* metric"
            )
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
        from lepton_ray.config.model import position_limit

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
    def _pruning_fits_the_model(self) -> ExperimentConfig:
        from lepton_ray.config.compress import prune_problem

        problem = prune_problem(self)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _space_is_searchable(self) -> ExperimentConfig:
        for key in self.tune.space:
            tunable = key.split(".")[0] in TUNABLE_SECTIONS or key in TUNABLE_KEYS
            if not tunable or key in UNTUNABLE_KEYS:
                raise ValueError(f"tune.space key '{key}' cannot be searched: {UNTUNABLE_REASON}")
            try:
                _check_dotted_key(ExperimentConfig, key, where="tune.space")
            except ConfigError as err:
                raise ValueError(str(err)) from None
        for variants in self.tune.space.values():
            for param in variants if isinstance(variants, list) else [variants]:
                if param.ratio_of:
                    try:
                        _check_dotted_key(ExperimentConfig, param.ratio_of, where="ratio_of")
                    except ConfigError as err:
                        raise ValueError(str(err)) from None
        if self.tune.space or self.tune.enabled:
            check_space(self.tune, self._accepts)
        return self

    def _accepts(self, key: str, value: Any) -> None:
        """Refuse a searched value the config itself would refuse (a range past a bound)."""
        # A sweep tokenizes at data.max_length; its trials' and best configs (tune off)
        # set a searched value below it and keep the space.
        if key == "data.max_length" and self.tune.enabled and value > self.data.max_length:
            raise ValueError(
                f"tune.space.data.max_length: {value!r} is above data.max_length "
                f"{self.data.max_length}, the length every trial's data is tokenized at "
                "(once, for the whole sweep; a trial cuts its rows shorter); raise "
                "data.max_length to the longest length searched"
            )
        raw = self.model_dump(mode="json")
        raw["tune"] = {"enabled": False, "metric": self.tune.metric}
        _set_dotted(raw, key, value)
        try:
            ExperimentConfig.model_validate(raw, context={CHECK_FILES: False})
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ValueError(
                f"tune.space.{key}: {value!r} is outside what the config accepts "
                f"({where}: {first['msg']})"
            ) from None

    # Paths every stage agrees on ---------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return (self.output_dir / self.name).resolve()

    @property
    def storage_root(self) -> Location:
        """Where shards and checkpoints go: ``cluster.storage_path``, else ``output_dir``.

        A ``Path``, or a :class:`~lepton_ray.runtime.uri.Uri` for an object store (it joins
        with ``/`` like a path; ``runtime.uri`` reads and writes both kinds)."""
        return location(self.cluster.storage_path or self.output_dir)

    @property
    def data_dir(self) -> Location:
        return self.storage_root / self.name / "data"

    @property
    def checkpoint_root(self) -> Location:
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
            shown = _USERINFO.sub(r"\g<scheme>***@", shown)  # never echo a URI's password
            lines.append(f"{source}: {msg}" if not loc else f"{source}: {key}: {msg}{shown}")
    return "\n".join(lines)


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


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
