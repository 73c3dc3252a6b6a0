from pathlib import Path

import pytest

from lepton_ray.config import apply_overrides, load_experiment, validate_experiment
from lepton_ray.errors import ConfigError
from tests.conftest import ROOT, write_yaml

QUICKSTART = ROOT / "experiments" / "quickstart.yaml"


def minimal(tmp_path: Path, **extra) -> dict:
    data = tmp_path / "d.csv"
    data.write_text("text,label\na,0\nb,1\n")
    return {"name": "t", "data": {"path": str(data)}, **extra}


@pytest.mark.parametrize(
    "path", sorted((ROOT / "experiments").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_experiment_validates(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    text = path.read_text()
    if "../shared/data" in text and not (ROOT.parent / "shared" / "data").is_dir():
        pytest.skip(f"{path.name} reads ../shared/data, which is absent here")
    cfg = load_experiment(path)
    assert cfg.name
    if cfg.data.path is not None:
        assert cfg.data.path.exists()
    else:  # a local file read through a datasets builder (json)
        files = cfg.data.hf.data_files
        assert all(Path(f).exists() for f in ([files] if isinstance(files, str) else files))


def test_quickstart_defaults_and_absolute_paths(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_experiment(QUICKSTART)
    assert cfg.task == "sequence_classification"
    assert cfg.scaling.num_workers * cfg.scaling.resources_per_worker["CPU"] == 2  # one 2-core node
    assert cfg.tune.num_samples >= 4
    # Ray workers run elsewhere, so every path the workers read must be absolute.
    assert cfg.tracking.tracking_uri.startswith("sqlite:////")
    assert Path(cfg.tracking.artifact_location).is_absolute()
    assert cfg.cluster.storage_path is None and cfg.checkpoint_root.is_absolute()
    assert cfg.data_dir == cfg.output_dir / cfg.name / "data"


def test_override_sets_nested_value(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_experiment(QUICKSTART, ["train.lr=3e-4", "peft.lora.r=4", "serve.enabled=false"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.peft.lora.r == 4
    assert cfg.serve.enabled is False


def test_unknown_override_suggests_nearest_key(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match=r"unknown key 'train.lrr' \(did you mean 'train.lr'\?\)"):
        load_experiment(QUICKSTART, ["train.lrr=1"])


def test_unknown_yaml_key_names_file_and_suggestion(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", minimal(tmp_path, train={"epochz": 3}))
    with pytest.raises(ConfigError) as err:
        load_experiment(path)
    assert str(path) in str(err.value)
    assert "unknown key 'train.epochz'" in str(err.value)
    assert "did you mean 'train.epochs'" in str(err.value)


def test_wrong_type_and_out_of_range(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", minimal(tmp_path, train={"epochs": "many"}))
    with pytest.raises(ConfigError, match=r"train.epochs: .*integer"):
        load_experiment(path)
    path = write_yaml(
        tmp_path / "c.yaml",
        minimal(tmp_path, data=None)
        | {"data": {"path": str(tmp_path / "d.csv"), "split": {"validation": 0.6, "test": 0.5}}},
    )
    with pytest.raises(ConfigError, match="validation \\+ data.split.test must be below 1.0"):
        load_experiment(path)


def test_missing_data_file_and_missing_config(tmp_path):
    path = write_yaml(
        tmp_path / "c.yaml", {"name": "t", "data": {"path": str(tmp_path / "nope.csv")}}
    )
    with pytest.raises(ConfigError, match="data.path: data file not found"):
        load_experiment(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_experiment(tmp_path / "absent.yaml")


def test_malformed_yaml_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: t\ndata: {path: [unclosed\n")
    with pytest.raises(ConfigError, match=r"malformed YAML \(line \d+"):
        load_experiment(path)


def test_missing_required_section(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"name": "t"})
    with pytest.raises(ConfigError, match="missing required key 'data'"):
        load_experiment(path)


def test_tune_space_keys_must_exist(tmp_path):
    cfg = minimal(
        tmp_path, tune={"space": {"train.lrate": {"type": "loguniform", "low": 1e-4, "high": 1e-3}}}
    )
    with pytest.raises(
        ConfigError,
        match=r"<config>: tune.space: unknown key 'train.lrate' \(did you mean 'train.lr'",
    ):
        validate_experiment(cfg)
    cfg = minimal(
        tmp_path, tune={"space": {"train.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-4}}}
    )
    with pytest.raises(ConfigError, match="must be below 'high'"):
        validate_experiment(cfg)


def test_apply_overrides_validates(tmp_path):
    cfg = validate_experiment(minimal(tmp_path))
    assert apply_overrides(cfg, {"peft.lora.r": 16}).peft.lora.r == 16
    with pytest.raises(ConfigError):
        apply_overrides(cfg, {"peft.lora.r": 0})


def test_fingerprint_changes_with_config(tmp_path):
    cfg = validate_experiment(minimal(tmp_path))
    assert cfg.fingerprint() == validate_experiment(minimal(tmp_path)).fingerprint()
    assert cfg.fingerprint() != apply_overrides(cfg, {"train.lr": 1e-4}).fingerprint()


@pytest.mark.parametrize("fraction", [0, 0.0, -0.1])
def test_a_validation_split_is_required(tmp_path, fraction):
    cfg = minimal(tmp_path)
    cfg["data"]["split"] = {"validation": fraction, "test": 0.1}
    with pytest.raises(ConfigError, match=r"data.split.validation: must be above 0"):
        validate_experiment(cfg)


@pytest.mark.parametrize(
    "key, param",
    [
        ("data.clean.lowercase", {"type": "choice", "values": [True, False]}),
        ("model.name", {"type": "choice", "values": ["minilm", "bert-base-uncased"]}),
        ("data.split.seed", {"type": "int", "low": 0, "high": 5}),
        ("train.epochs", {"type": "int", "low": 1, "high": 5}),
    ],
)
def test_tune_space_refuses_keys_a_sweep_cannot_change(tmp_path, key, param):
    cfg = minimal(tmp_path, tune={"space": {key: param}})
    with pytest.raises(ConfigError, match=rf"tune.space key '{key}' cannot be searched.*train\.lr"):
        validate_experiment(cfg)


def test_tune_space_accepts_train_and_peft_keys(tmp_path):
    space = {
        "train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-3},
        "peft.lora.r": {"type": "choice", "values": [4, 8]},
    }
    assert set(validate_experiment(minimal(tmp_path, tune={"space": space})).tune.space) == set(
        space
    )


def test_negative_compress_max_drop_and_registry_tolerance_are_refused(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match=r"compress.max_drop: .*greater than or equal to 0"):
        load_experiment(QUICKSTART, ["compress.max_drop=-0.5"])
    with pytest.raises(ConfigError, match=r"registry.tolerance: .*greater than or equal to 0"):
        load_experiment(QUICKSTART, ["registry.tolerance=-0.01"])
    with pytest.raises(ConfigError, match=r"registry.promotion: "):
        load_experiment(QUICKSTART, ["registry.promotion=sometimes"])


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "example.com"])
def test_an_exposed_endpoint_needs_an_api_key(monkeypatch, host):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match="no API key: set serve.api_key_env"):
        load_experiment(ROOT / "experiments/quickstart.yaml", [f"serve.host={host}"])
    cfg = load_experiment(
        ROOT / "experiments/quickstart.yaml",
        [f"serve.host={host}", "serve.api_key_env=LEPTON_API_KEY"],
    )
    assert cfg.serve.host == host


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_needs_no_key(monkeypatch, host):
    monkeypatch.chdir(ROOT)
    cfg = load_experiment(ROOT / "experiments/quickstart.yaml", [f"serve.host={host}"])
    assert cfg.serve.api_key_env is None


def test_serve_limits_derive_from_the_batch(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_experiment(ROOT / "experiments/quickstart.yaml", ["serve.max_batch_size=16"])
    s = cfg.serve
    assert s.queued_texts == 64 and s.ongoing_requests == 64 + 64 == s.queued_requests
    # Ray's default of 5 would cap a batch below max_batch_size: never derived.
    assert s.ongoing_requests >= s.max_batch_size * s.max_concurrent_batches
    cfg = load_experiment(
        ROOT / "experiments/quickstart.yaml",
        ["serve.max_queued_texts=10", "serve.max_ongoing_requests=20"],
    )
    assert (cfg.serve.queued_texts, cfg.serve.ongoing_requests) == (10, 20)
    assert cfg.serve.queued_requests == 20
