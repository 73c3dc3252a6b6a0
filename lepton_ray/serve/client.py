"""HTTP client for the Serve endpoint, and deployment helpers."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from lepton_ray.config import ExperimentConfig
from lepton_ray.errors import LeptonError


def endpoint_url(cfg: ExperimentConfig) -> str:
    prefix = cfg.serve.route_prefix.rstrip("/")
    return f"http://{cfg.serve.host}:{cfg.serve.port}{prefix}"


def api_key(cfg: ExperimentConfig) -> str | None:
    """The endpoint's API key, from the variable ``serve.api_key_env`` names (None: no key)."""
    name = cfg.serve.api_key_env
    if not name:
        return None
    key = os.environ.get(name, "").strip()
    if not key:
        raise LeptonError(
            f"serve.api_key_env is {name}, but the environment variable {name} is not set "
            "(or empty): export it with the endpoint's API key"
        )
    return key


def auth_headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def generates(cfg: ExperimentConfig) -> bool:
    """Whether the experiment's models are served by the generation (OpenAI) API."""
    from lepton_ray.tasks import get_task

    return get_task(cfg.task).serving == "generate"


def route(cfg: ExperimentConfig) -> str:
    return "/v1/chat/completions" if generates(cfg) else "/v1/predict"


def _post(url: str, body: dict, timeout: float, key: str | None) -> dict[str, Any]:
    """POST JSON; a clear error when the endpoint is down or refuses."""
    import requests

    try:
        resp = requests.post(url, json=body, timeout=timeout, headers=auth_headers(key))
    except requests.ConnectionError:
        raise LeptonError(
            f"no Serve endpoint answers at {url}; deploy one with `lepton-ray serve CONFIG`"
        ) from None
    if resp.status_code != 200:
        try:
            detail = resp.json().get("error", resp.text)
            if isinstance(detail, dict):  # OpenAI's shape
                detail = detail.get("message", detail)
        except ValueError:
            detail = resp.text[:200]
        raise LeptonError(f"{url} answered {resp.status_code}: {detail}")
    return resp.json()


def predict(
    base_url: str, texts: list[str], timeout: float = 60.0, key: str | None = None
) -> list[dict[str, Any]]:
    """POST texts to ``/v1/predict``."""
    return _post(f"{base_url}/v1/predict", {"texts": texts}, timeout, key)["predictions"]


def chat(
    base_url: str, prompts: list[str], timeout: float = 300.0, key: str | None = None
) -> list[dict[str, Any]]:
    """Each prompt as one user message to ``/v1/chat/completions`` (greedy)."""
    answers = []
    for prompt in prompts:
        body = {"messages": [{"role": "user", "content": prompt}], "temperature": 0.0}
        reply = _post(f"{base_url}/v1/chat/completions", body, timeout, key)
        choice = reply["choices"][0]
        answers.append({"text": choice["message"]["content"], **reply["usage"]})
    return answers


def wait_healthy(
    base_url: str, timeout_s: float = 120.0, version: str | None = None, path: str = "/healthz"
) -> None:
    """Wait until ``path`` answers 200 (and, given ``version``, reports that model version)."""
    import requests

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            resp = requests.get(f"{base_url}{path}", timeout=5)
            if resp.status_code == 200 and (
                version is None or str(resp.json().get("model_version")) == str(version)
            ):
                return
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.5)
    what = f"serving version {version}" if version else "healthy"
    raise LeptonError(f"the Serve endpoint at {base_url} was not {what} in {timeout_s:.0f} s")


def check_proxy_address(host: str, port: int) -> None:
    """Serve has one HTTP proxy per cluster; a second address in a config cannot be honoured.

    Checked when a run starts (nothing to check while Serve is not started on the connected
    cluster: the deployment starts it on ``host:port``) and again once Serve is started."""
    from ray.serve.context import _get_global_client

    serve_client = _get_global_client(raise_if_no_controller_running=False)
    if serve_client is None:
        return
    http = serve_client.http_config
    if (http.host, http.port) != (host, port):
        raise LeptonError(
            f"Ray Serve on this cluster already listens on http://{http.host}:{http.port}, not "
            f"serve.host:serve.port = {host}:{port}; set serve.port: {http.port} (one HTTP "
            "address per cluster), or restart the cluster"
        )


def deploy(cfg: ExperimentConfig, model_uri: str, log=print) -> tuple[str, str]:
    """Deploy ``model_uri`` with Ray Serve on the connected cluster.

    An alias is resolved here, once, to ``models:/NAME/VERSION``: every replica, including
    one restarted after the alias moved, loads that version. Returns the base URL and the
    pinned model URI.
    """
    from ray import serve

    from lepton_ray.serve.app import ServeArgs, build_app
    from lepton_ray.serve.generation_app import build_generation_app
    from lepton_ray.serve.guards import key_digest
    from lepton_ray.tracking.mlflow import get_model_version

    s = cfg.serve
    key = api_key(cfg)
    version = get_model_version(cfg.tracking.tracking_uri, model_uri)
    pinned = f"models:/{version.name}/{version.version}"
    serve.start(
        http_options={
            "host": s.host,
            "port": s.port,
            "request_timeout_s": s.request_timeout_s,
            "keep_alive_timeout_s": s.keep_alive_timeout_s,
        }
    )
    check_proxy_address(s.host, s.port)
    samples = s.log_sample_path or cfg.output_dir / cfg.name / "serve" / "predictions.jsonl"
    args = ServeArgs(
        tracking_uri=cfg.tracking.tracking_uri,
        model_uri=pinned,
        model_name=version.name,
        model_version=str(version.version),
        max_batch_size=s.max_batch_size,
        max_concurrent_batches=s.max_concurrent_batches,
        batch_wait_timeout_s=s.batch_wait_timeout_s,
        adaptive_batch_wait=s.adaptive_batch_wait,
        max_queued_texts=s.queued_texts,
        retry_after_s=s.retry_after_s,
        body_timeout_s=s.body_timeout_s,
        max_body_bytes_in_flight=s.max_body_bytes_in_flight,
        api_key_sha256=key_digest(key) if key else None,
        log_sample_rate=s.log_sample_rate,
        log_sample_path=str(Path(samples)) if s.log_sample_rate > 0 else None,
        max_texts_per_request=s.max_texts_per_request,
        max_chars_per_text=s.max_chars_per_text,
        torch_threads=s.torch_threads,
        max_tokens_limit=s.max_tokens_limit,
        default_max_tokens=min(s.default_max_tokens, s.max_tokens_limit),
        generation_batch_size=s.generation_batch_size,
    )
    app_name = s.app_name or cfg.name
    shown = pinned if pinned == model_uri else f"{model_uri} = {pinned}"
    if generates(cfg) and _engine(cfg, key) == "vllm":
        return _deploy_vllm(cfg, pinned, version, app_name, shown, log)
    log(f"[serve] deploying {shown} as application '{app_name}' on http://{s.host}:{s.port}")
    serve.run(
        (build_generation_app if generates(cfg) else build_app)(
            args,
            host=s.host,
            num_replicas=s.num_replicas,
            num_cpus=s.num_cpus,
            max_ongoing_requests=s.ongoing_requests,
            max_queued_requests=s.queued_requests,
            access_log=s.access_log,
        ),
        name=app_name,
        route_prefix=s.route_prefix,
        blocking=False,
    )
    url = endpoint_url(cfg)
    # A running application of the same model swaps in place (user_config): no gap.
    wait_healthy(url, version=str(version.version))
    log(f"[serve] ready at {url}{route(cfg)}")
    return url, pinned


def _engine(cfg: ExperimentConfig, key: str | None) -> str:
    """'hf' or 'vllm' (serve.engine, resolved against this cluster's GPUs)."""
    import ray

    from lepton_ray.serve.vllm_app import choose_engine

    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    return choose_engine(cfg.serve.engine, gpus, has_key=bool(key))


def _deploy_vllm(cfg, pinned: str, version, app_name: str, shown: str, log):
    """``ray.serve.llm`` over the version exported as a Hugging Face folder."""
    from ray import serve

    from lepton_ray.serve.vllm_app import build_vllm_app, export_folder

    s = cfg.serve
    folder = cfg.output_dir / cfg.name / "serve" / f"vllm-{version.name}-{version.version}"
    log(f"[serve] exporting {pinned} for vLLM to {folder}")
    export_folder(cfg.tracking.tracking_uri, pinned, folder)
    log(f"[serve] deploying {shown} with vLLM as application '{app_name}'")
    serve.run(
        build_vllm_app(folder, version.name, None, s.num_replicas),
        name=app_name,
        route_prefix=s.route_prefix,
        blocking=False,
    )
    url = endpoint_url(cfg)
    wait_healthy(url, timeout_s=900, path="/v1/models")  # vLLM loads and compiles the model
    log(f"[serve] ready at {url}/v1/chat/completions (vLLM)")
    return url, pinned


def undeploy(cfg: ExperimentConfig, log=print) -> bool:
    """Delete this experiment's Serve application; False when none was running."""
    from ray import serve

    from lepton_ray.runtime.cluster import serve_applications

    app_name = cfg.serve.app_name or cfg.name
    if app_name not in serve_applications():
        return False
    serve.delete(app_name)
    log(f"[serve] stopped application '{app_name}'")
    return True
