"""Loading an artifact or checkpoint never unpickles: planted pickles are refused, not run."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from lepton_ray.artifacts import ModelMeta, build_model, load_tokenizer
from lepton_ray.compress.formats import load_model_artifact
from lepton_ray.config import ModelConfig, validate_experiment
from lepton_ray.errors import StageError
from lepton_ray.train.checkpoint import (
    STATE_FILE,
    TRAINABLE_FILE,
    artifact_meta,
    restore_checkpoint,
    write_checkpoint,
)
from lepton_ray.train.loop import LoopState, build_optimizer, build_scheduler
from tests.conftest import TINY_BERT, smoke_config

LABELS = ["neg", "pos"]
TASK = "sequence_classification"


class Boom:
    """Unpickling this runs ``touch <marker>``: the attack a pickle loader would fall for."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


@pytest.fixture(scope="module")
def tiny_model():
    return build_model(
        ModelConfig(name="minilm", random_init=True, config_overrides=TINY_BERT), TASK, LABELS
    )


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "pwned"


def plant_pickle(path: Path, marker: Path, with_torch: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if with_torch:
        torch.save({"state": Boom(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(Boom(marker)))


def artifact(folder: Path, tokenizer, weights: str, base_model: str = "minilm") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    ModelMeta(TASK, LABELS, base_model, 32, weights=weights).save(folder)
    return folder


def test_the_planted_payload_is_live(tmp_path, marker):
    """Control: the payload really runs when unpickled, so the tests below mean something."""
    plant_pickle(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("with_torch", [True, False])
def test_int8_artifact_with_a_pickled_model_int8_pt_is_refused(
    tmp_path, marker, tokenizer, tiny_model, with_torch
):
    folder = artifact(tmp_path / "int8", tokenizer, "int8")
    tiny_model.config.save_pretrained(folder / "config")
    plant_pickle(folder / "model_int8.pt", marker, with_torch)
    with pytest.raises(StageError, match=r"model_int8\.pt is a pickle file.*re-run compress"):
        load_model_artifact(folder)
    assert not marker.exists()


def test_a_pickle_renamed_to_safetensors_is_refused(tmp_path, marker, tokenizer, tiny_model):
    folder = artifact(tmp_path / "int8", tokenizer, "int8")
    tiny_model.config.save_pretrained(folder / "config")
    plant_pickle(folder / "model_int8.safetensors", marker)
    with pytest.raises(StageError, match="model_int8.safetensors: not a valid safetensors file"):
        load_model_artifact(folder)
    assert not marker.exists()


def test_full_artifact_with_only_pytorch_model_bin_is_refused(
    tmp_path, marker, tokenizer, tiny_model
):
    folder = artifact(tmp_path / "full", tokenizer, "full")
    tiny_model.config.save_pretrained(folder / "model")
    plant_pickle(folder / "model" / "pytorch_model.bin", marker)
    with pytest.raises(StageError, match=r"pytorch_model\.bin is a pickle file"):
        load_model_artifact(folder)
    assert not marker.exists()


def test_adapter_artifact_with_only_adapter_model_bin_is_refused(tmp_path, marker, tokenizer):
    folder = artifact(tmp_path / "lora", tokenizer, "adapter")
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["query", "value"]})
    )
    plant_pickle(folder / "adapter" / "adapter_model.bin", marker)
    with pytest.raises(StageError, match=r"adapter_model\.bin is a pickle file"):
        load_model_artifact(folder)
    assert not marker.exists()


def test_adapter_artifact_whose_random_base_is_a_pickle_is_refused(
    tmp_path, marker, tokenizer, tiny_model
):
    folder = artifact(tmp_path / "lora", tokenizer, "adapter", base_model="./base")
    tiny_model.config.save_pretrained(folder / "base")
    plant_pickle(folder / "base" / "pytorch_model.bin", marker)
    with pytest.raises(StageError, match=r"base/pytorch_model\.bin is a pickle file"):
        load_model_artifact(folder)
    assert not marker.exists()


@pytest.mark.parametrize("base", ["./../..", "./base/../../outside", "./", "./."])
def test_a_dot_slash_base_model_cannot_leave_the_artifact(tmp_path, tokenizer, tiny_model, base):
    outside = tmp_path / "outside"
    tiny_model.save_pretrained(outside)  # a real model there: only the path check can refuse
    folder = artifact(tmp_path / "a" / "lora", tokenizer, "adapter", base_model=base)
    with pytest.raises(StageError, match="is not a folder inside the artifact folder"):
        load_model_artifact(folder)


def test_a_base_symlinked_out_of_the_artifact_is_refused(tmp_path, tokenizer, tiny_model):
    outside = tmp_path / "outside"
    tiny_model.save_pretrained(outside)
    folder = artifact(tmp_path / "lora", tokenizer, "adapter", base_model="./base")
    (folder / "base").symlink_to(outside, target_is_directory=True)
    with pytest.raises(StageError, match="is not a folder inside the artifact folder"):
        load_model_artifact(folder)


def _checkpoint(tmp_path: Path, tokenizer, tiny_model):
    cfg = validate_experiment(
        smoke_config(tmp_path, Path(__file__), peft={"method": "none"}, model={"random_init": True})
    )
    opt = build_optimizer(tiny_model, 1e-3, 0.0)
    sched = build_scheduler(opt, 10, 0.1)
    folder = write_checkpoint(
        tmp_path / "ckpt", tiny_model, tokenizer, artifact_meta(cfg, LABELS), opt, sched,
        LoopState(epoch=1, best=0.5, history=[{"epoch": 1, "val_accuracy": 0.5}]),
    )  # fmt: skip
    return folder, opt, sched


def test_checkpoint_whose_state_file_is_a_pickle_is_refused(
    tmp_path, marker, tokenizer, tiny_model
):
    folder, opt, sched = _checkpoint(tmp_path, tokenizer, tiny_model)
    plant_pickle(folder / STATE_FILE, marker)
    with pytest.raises(StageError, match=rf"{STATE_FILE} is not a plain tensor/value state file"):
        restore_checkpoint(folder, tiny_model, opt, sched)
    assert not marker.exists()


def test_checkpoint_whose_state_file_is_a_raw_pickle_is_refused(
    tmp_path, marker, tokenizer, tiny_model
):
    folder, opt, sched = _checkpoint(tmp_path, tokenizer, tiny_model)
    plant_pickle(folder / STATE_FILE, marker, with_torch=False)
    with pytest.raises(StageError, match="refusing to unpickle"):
        restore_checkpoint(folder, tiny_model, opt, sched)
    assert not marker.exists()


def test_checkpoint_whose_trainable_file_is_a_pickle_is_refused(
    tmp_path, marker, tokenizer, tiny_model
):
    folder, opt, sched = _checkpoint(tmp_path, tokenizer, tiny_model)
    plant_pickle(folder / TRAINABLE_FILE, marker)
    with pytest.raises(StageError, match="not a valid safetensors file"):
        restore_checkpoint(folder, tiny_model, opt, sched)
    assert not marker.exists()
