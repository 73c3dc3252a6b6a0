"""The GPU path of the generation API: Ray Serve's own LLM stack (``ray.serve.llm``, vLLM).

``serve.engine`` picks the engine of a language model's endpoint:

- ``hf``: lepton-ray's engine (``lepton_ray.serve.engine``) behind ``generation_app``; runs
  anywhere torch runs, CPUs included;
- ``vllm``: the registered version exported as a plain Hugging Face folder (PEFT adapters
  merged, the artifact's tokenizer and chat template beside it) and served by
  ``ray.serve.llm.build_openai_app``; needs vLLM and a GPU in the cluster;
- ``auto``: ``vllm`` where vLLM imports here, the cluster has a GPU and no API key is
  asked for, else ``hf``.

Both answer the same OpenAI routes (``/v1/chat/completions``, ``/v1/completions``,
``/v1/models``), so one client works against either. ``ray.serve.llm`` checks no API key,
so a vLLM endpoint with ``serve.api_key_env`` set is refused (fail closed) rather than
served open; put it behind a gateway that checks keys instead.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

from lepton_ray.errors import LeptonError

ENGINES = ("auto", "hf", "vllm")


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def choose_engine(setting: str, cluster_gpus: float, has_key: bool) -> str:
    """'hf' or 'vllm' for ``serve.engine`` = ``setting``; a one-line error where 'vllm' is
    asked for and cannot run, or would run without the API key the config asks for."""
    if setting not in ENGINES:
        raise LeptonError(f"serve.engine must be one of {', '.join(ENGINES)}, got {setting!r}")
    usable = vllm_installed() and cluster_gpus >= 1 and not has_key
    if setting == "hf" or (setting == "auto" and not usable):
        return "hf"
    if not vllm_installed():
        raise LeptonError("serve.engine is vllm, but vLLM is not installed here (pip install vllm)")
    if cluster_gpus < 1:
        raise LeptonError("serve.engine is vllm, but the Ray cluster has no GPU; use hf or auto")
    if has_key:
        raise LeptonError(
            "serve.engine vllm (ray.serve.llm) does not check API keys, and serve.api_key_env "
            "is set: refusing to serve it open. Use serve.engine: hf, or unset the key and "
            "put a gateway that checks keys in front"
        )
    return "vllm"


def export_folder(tracking_uri: str, model_uri: str, dest: Path) -> Path:
    """The registered version as a Hugging Face folder vLLM loads: float weights (adapters
    merged), tokenizer, chat template and generation config. Written beside ``dest`` and
    renamed into place once complete; an existing complete export is reused."""
    from lepton_ray.artifacts import ModelMeta, unmerged_refusal
    from lepton_ray.compress.formats import FLOAT_KINDS, load_model_artifact
    from lepton_ray.tasks import get_task
    from lepton_ray.tracking.mlflow import download_model

    done = dest / "config.json"
    if done.exists():
        return dest
    work = dest.with_name(dest.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    artifact = download_model(tracking_uri, model_uri, work / "artifact")
    meta = ModelMeta.load(artifact)  # refuse before loading the weights
    task = get_task(meta.task)
    if task.serving != "generate":
        raise LeptonError(f"{model_uri} is a '{meta.task}' model: vLLM serves language models")
    if meta.weights not in FLOAT_KINDS:
        raise LeptonError(
            f"{model_uri} holds '{meta.weights}' weights, which vLLM cannot load; register "
            "an uncompressed version (compress.enabled: false) for serve.engine: vllm"
        )
    why_not = unmerged_refusal(meta, "serve.engine: vllm")
    if why_not:
        raise LeptonError(f"{model_uri}: {why_not}")
    model, tokenizer, meta = load_model_artifact(artifact)
    task.check_tokenizer(tokenizer, meta)  # the template it was trained with, or nothing
    out = work / "hf"
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    shutil.rmtree(work / "artifact", ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    out.rename(dest)
    shutil.rmtree(work, ignore_errors=True)
    return dest


def build_vllm_app(folder: Path, served_name: str, max_context: int | None, replicas: int):
    """``ray.serve.llm``'s OpenAI application over ``folder``, named ``served_name``."""
    from ray.serve.llm import LLMConfig, build_openai_app

    engine_kwargs: dict[str, Any] = {"dtype": "auto"}
    if max_context:
        engine_kwargs["max_model_len"] = int(max_context)
    config = LLMConfig(
        model_loading_config={"model_id": served_name, "model_source": str(folder)},
        deployment_config={
            "autoscaling_config": {"min_replicas": replicas, "max_replicas": replicas}
        },
        engine_kwargs=engine_kwargs,
    )
    return build_openai_app({"llm_configs": [config]})
