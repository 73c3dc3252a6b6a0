"""The experiment schema: one typed, validated config per YAML file.

Sections mirror the library objects they build (``scaling`` -> ``ray.train.ScalingConfig``,
``peft.lora`` -> ``peft.LoraConfig``). Every section forbids unknown keys, and every error
names the YAML key and the file it came from. One module per section; ``experiment`` puts
them together and loads YAML files. Import from this package: ``from lepton_ray.config
import ExperimentConfig, load_experiment``.
"""

from lepton_ray.config.base import CHECK_FILES, Section, checking_files
from lepton_ray.config.cluster import ClusterSection
from lepton_ray.config.compress import CompressSection
from lepton_ray.config.data import (
    DATA_SUFFIXES,
    SPLIT_NAMES,
    AugmentConfig,
    CleanConfig,
    DataConfig,
    DedupConfig,
    HFSource,
    NearDupConfig,
    SplitConfig,
)
from lepton_ray.config.experiment import (
    ExperimentConfig,
    Task,
    apply_overrides,
    dump_yaml,
    load_experiment,
    parse_override,
    validate_experiment,
)
from lepton_ray.config.model import MODEL_ALIASES, ModelConfig, position_limit, resolve_model_path
from lepton_ray.config.peft import (
    AdaLoraSection,
    IA3Section,
    LoraSection,
    PeftSection,
    PrefixSection,
    PromptSection,
)
from lepton_ray.config.serve import ServeSection, is_loopback, serve_slots
from lepton_ray.config.tracking import RegistrySection, TrackingSection
from lepton_ray.config.train import EarlyStoppingSection, ScalingSection, TrainConfig
from lepton_ray.config.tune import (
    REPORTED_METRICS,
    SEARCHERS,
    TUNABLE_SECTIONS,
    UNTUNABLE_KEYS,
    UNTUNABLE_REASON,
    SchedulerSection,
    SearchParam,
    TuneSection,
    metric_mode,
)

__all__ = [
    "CHECK_FILES",
    "DATA_SUFFIXES",
    "MODEL_ALIASES",
    "REPORTED_METRICS",
    "SPLIT_NAMES",
    "TUNABLE_SECTIONS",
    "UNTUNABLE_KEYS",
    "UNTUNABLE_REASON",
    "AugmentConfig",
    "CleanConfig",
    "ClusterSection",
    "CompressSection",
    "DataConfig",
    "DedupConfig",
    "EarlyStoppingSection",
    "ExperimentConfig",
    "HFSource",
    "LoraSection",
    "AdaLoraSection",
    "IA3Section",
    "PrefixSection",
    "PromptSection",
    "ModelConfig",
    "NearDupConfig",
    "PeftSection",
    "RegistrySection",
    "ScalingSection",
    "SEARCHERS",
    "SchedulerSection",
    "SearchParam",
    "Section",
    "ServeSection",
    "SplitConfig",
    "Task",
    "TrackingSection",
    "TrainConfig",
    "TuneSection",
    "apply_overrides",
    "checking_files",
    "dump_yaml",
    "is_loopback",
    "load_experiment",
    "metric_mode",
    "parse_override",
    "position_limit",
    "resolve_model_path",
    "serve_slots",
    "validate_experiment",
]
