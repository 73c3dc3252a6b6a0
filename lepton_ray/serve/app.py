"""A FastAPI ingress on a Ray Serve deployment, built from typed arguments.

Serve never imports train or tune: it loads a registered artifact through ``models`` and
``tracking``. Every deployment is pinned to one registered version (``models:/NAME/N``),
resolved once when it is deployed, so a restarted replica loads the same model. Each text
is validated before it joins a batch, texts are cleaned exactly as in training, and texts
from concurrent requests share one forward pass; a text that fails inside a batch fails
only its own request. Every error is JSON ``{"error": ...}``.

Which model a replica serves is its ``user_config`` (``ModelChoice``), not its constructor
arguments: a promotion redeploys with a new ``user_config`` only, which Ray Serve applies in
place (``reconfigure``) instead of replacing the replica. The new version is loaded beside
the old one, off the event loop, while the old one keeps answering; then one reference is
switched. A batch runs on the model it started with, so every answer comes from exactly
one whole model, and no request fails during the swap (requests that arrive while the
new version loads can wait for it: the load competes for the GIL and the cores).

Load is bounded in four places, so that the endpoint sheds instead of collapsing:

- a request is admitted before its body is read: the bytes of the bodies a replica holds
  (announced by ``Content-Length``, else counted as they arrive) stay within
  ``max_body_bytes_in_flight``, and one more gets 503 with ``Retry-After`` at once;
- a request body must arrive within ``body_timeout_s`` (408 otherwise), so a stalled upload
  holds nothing for long, and the body is read before the request counts toward the model;
- a replica holds at most ``max_queued_texts`` texts for its model (running or waiting); one
  more request gets 503 with ``Retry-After`` at once (``/healthz`` never counts);
- Ray Serve's router holds at most ``max_queued_requests`` when every replica slot is taken
  (503 with ``Retry-After`` beyond; ``BackpressureConfig``), and the proxy ends any request
  after ``request_timeout_s`` (408).

Until the replica is ready every request gets 503 (``"code": "not_ready"``), so no request
passes the API key unchecked. A 503 says why in ``code``: ``not_ready`` (no model loaded yet),
``overloaded`` (texts queued) or ``overloaded_bytes`` (bodies in flight).

``/metrics`` is the replica's own Prometheus text (requests by route and status, latency and batch-size
histograms, shed requests, queued texts, body bytes in flight and their peak).

What every serving app shares (readiness, API key, body admission, JSON errors) is in
``guards``; the Prometheus series are in ``metrics``, the prediction sample in ``sample_log``.
"""

import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from lepton_ray.serve.guards import (
    NOT_READY,
    _crash,
    _Guard,
    _http_error,
    _invalid_request,
    _Refusal,
    check_exposure,
)
from lepton_ray.serve.metrics import _Metrics
from lepton_ray.serve.sample_log import _SampleLog
from lepton_ray.tracking.mlflow import _URI_CREDENTIALS

api = FastAPI(title="lepton-ray", description="Text classification served by lepton-ray.")
api.add_exception_handler(RequestValidationError, _invalid_request)
api.add_exception_handler(StarletteHTTPException, _http_error)
api.add_exception_handler(Exception, _crash)
api.add_middleware(_Guard)


class ServeArgs(BaseModel):
    """Everything a replica needs to find and run its model."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    tracking_uri: str = Field(description="MLflow tracking URI, credentials removed.")
    tracking_credentials: SecretStr | None = Field(
        None, description="USER:PASSWORD taken out of tracking_uri (never shown in text)."
    )
    model_uri: str | None = Field(None, description="The pinned version: models:/NAME/VERSION.")
    model_name: str | None = None
    model_version: str | None = None
    max_batch_size: int = 32
    max_concurrent_batches: int = 1
    batch_wait_timeout_s: float = 0.002
    adaptive_batch_wait: bool = True
    max_queued_texts: int = 128
    retry_after_s: int = 1
    body_timeout_s: float = 5.0
    max_body_bytes_in_flight: int = Field(64 * 2**20, ge=65_536)
    api_key_sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="SHA-256 (hex) of the API key."
    )
    api_key_sha256_env: str | None = Field(
        None,
        description="Environment variable of the cluster's nodes holding api_key_sha256 "
        "(a Kubernetes Secret); app_builder reads it.",
    )
    log_sample_rate: float = 0.0
    log_sample_path: str | None = None
    max_texts_per_request: int = 256
    max_chars_per_text: int = 20_000
    torch_threads: int | None = None
    # The generation app (a causal LM):
    max_tokens_limit: int = Field(512, ge=1, description="The most max_tokens a request may ask.")
    default_max_tokens: int = Field(128, ge=1, description="max_tokens when a request gives none.")
    generation_batch_size: int = Field(8, ge=1, description="Sequences decoded together.")

    @model_validator(mode="after")
    def _credentials_apart(self) -> "ServeArgs":
        # Deployment arguments are stored and shown by Ray: the URI keeps no password.
        found = _URI_CREDENTIALS.search(self.tracking_uri)
        if found:
            self.tracking_credentials = SecretStr(found.group("userinfo"))
            self.tracking_uri = _URI_CREDENTIALS.sub(r"\g<scheme>", self.tracking_uri, count=1)
        return self

    def mlflow_uri(self) -> str:
        """The tracking URI with its credentials, for the replica's MLflow calls only."""
        if self.tracking_credentials is None:
            return self.tracking_uri
        scheme, _, rest = self.tracking_uri.partition("://")
        return f"{scheme}://{self.tracking_credentials.get_secret_value()}@{rest}"


MODEL_FIELDS = ("model_uri", "model_name", "model_version")


class ModelChoice(BaseModel):
    """The replica's ``user_config``: which registered version it serves."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_uri: str
    model_name: str
    model_version: str


class _Loaded:
    """One whole loaded model; a replica switches between these, never edits one.

    It owns the folder its files were downloaded to, under ``root``: ``remove`` deletes it
    once another model has replaced this one."""

    def __init__(self, tracking_uri: str, choice: ModelChoice, root: Path):
        from lepton_ray.compress.formats import load_model_artifact
        from lepton_ray.tasks import get_task
        from lepton_ray.tracking.mlflow import download_model, get_model_version

        self.choice = choice
        self.folder = Path(tempfile.mkdtemp(prefix="model-", dir=root))
        try:
            artifact = download_model(tracking_uri, choice.model_uri, self.folder)
            self.model, self.tokenizer, self.meta = load_model_artifact(artifact)
            self.version = get_model_version(tracking_uri, choice.model_uri)
        except BaseException:
            self.remove()
            raise
        self.task = get_task(self.meta.task)
        self.labels = list(self.meta.labels)
        self.loaded_at = time.time()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[str] = Field(description="Texts to classify.")


class Prediction(BaseModel):
    label: str
    probabilities: dict[str, float]
    truncated: bool = Field(description="The text was longer than the model's max_length.")


class PredictResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    predictions: list[Prediction]
    model: str = Field(description="The registered version that answered: models:/NAME/N.")
    model_version: str


def check_texts(texts: list[str], max_texts: int, max_chars: int) -> None:
    """Refuse a request before any of its texts joins a batch (4xx, naming the text)."""
    if not texts:
        raise HTTPException(422, "texts: give at least one text")
    if len(texts) > max_texts:
        raise HTTPException(413, f"texts: {len(texts)} texts, at most {max_texts} per request")
    for i, text in enumerate(texts):
        if len(text) > max_chars:
            raise HTTPException(
                413, f"texts.{i}: {len(text)} characters, at most {max_chars} per text"
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise HTTPException(
                422, f"texts.{i}: not encodable as UTF-8 (a lone surrogate such as \\ud800?)"
            ) from None
        if not text.strip():
            raise HTTPException(422, f"texts.{i}: empty text")


class _TextFailed(Exception):
    """One text failed inside a batch; only its request fails."""


def _classify_isolated(loaded: _Loaded, texts: list[str]) -> list[dict[str, Any] | _TextFailed]:
    """The batch in one pass (the task's ``predict``); if that fails, text by text, so only
    the culprit fails."""
    predict = loaded.task.predict
    try:
        return predict(loaded.model, loaded.tokenizer, loaded.meta, texts)
    except Exception:  # noqa: BLE001 - find the culprit; its batch-mates still get answers
        out: list[dict[str, Any] | _TextFailed] = []
        for text in texts:
            try:
                out.extend(predict(loaded.model, loaded.tokenizer, loaded.meta, [text]))
            except Exception as err:  # noqa: BLE001
                out.append(_TextFailed(type(err).__name__))
        return out


class _Replica:
    """What every serving replica shares (the classifier's and the generation app's): its
    arguments, its Prometheus series and the guards' view of them, one folder per loaded
    model, and the in-place swap of ``reconfigure``. A subclass says how a version loads
    (``_load``) and adds its routes."""

    openai_errors = False  # the generation app answers errors in OpenAI's shape

    def __init__(self, args: dict[str, Any]):
        import torch

        self.args = ServeArgs.model_validate(args)
        torch.set_num_threads(self.args.torch_threads or max(1, os.cpu_count() or 1))
        self.loaded: _Loaded | None = None  # set by reconfigure (build_app's user_config)
        self.models_root = Path(tempfile.mkdtemp(prefix="lepton-serve-"))  # one folder per model
        self._swap = asyncio.Lock()
        self.metrics = _Metrics()
        # Through the imported module: Serve ships this class by value, with copies of the
        # module globals its methods name; the middleware reads its module's own.
        from lepton_ray.serve import guards

        guards._replica.settings = self.args
        guards._replica.metrics = self.metrics
        guards._replica.openai_errors = self.openai_errors
        self.samples = _SampleLog(self.args.log_sample_path, self.args.log_sample_rate)

    def _load(self, choice: ModelChoice) -> _Loaded:
        return _Loaded(self.args.mlflow_uri(), choice, self.models_root)

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve the version in ``config``: load it beside the current one, then switch."""
        choice = ModelChoice.model_validate(config)
        async with self._swap:
            if self.loaded is not None and self.loaded.choice == choice:
                return
            # In a thread: the event loop keeps answering with the current model meanwhile.
            loaded = await asyncio.to_thread(self._load, choice)
            self.metrics.model.clear()
            self.metrics.model.labels(choice.model_uri, choice.model_version).set(1)
            old, self.loaded = self.loaded, loaded
            if old is not None:
                # Its weights are in memory (batches still running on it keep them); the
                # files are not needed any more.
                old.remove()

    def __del__(self) -> None:
        # Serve calls this when it stops the replica: the model folders go with it.
        shutil.rmtree(self.models_root, ignore_errors=True)

    def _shed(self, held: str) -> _Refusal:
        """503 with Retry-After for a request beyond max_queued_texts (``held`` says what
        already waits), counted as shed."""
        self.metrics.shed.inc()
        return _Refusal(
            503,
            f"overloaded: {held} (max_queued_texts {self.args.max_queued_texts}); retry later",
            "overloaded",
            {"Retry-After": str(self.args.retry_after_s)},
        )

    def _current(self) -> _Loaded:
        if self.loaded is None:
            raise _Refusal(503, "no model loaded yet", NOT_READY, {"Retry-After": "1"})
        return self.loaded


# (Above the class: Serve serializes the class when it is decorated.)


@serve.deployment(name="TextClassifier", ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class TextClassifier(_Replica):
    def __init__(self, args: dict[str, Any]):
        super().__init__(args)
        self.queued = 0  # texts admitted and not yet answered

        async def run_batch(texts: list[str]) -> list[tuple[Any, ModelChoice]]:
            return await self._run_batch(texts)

        self._batch = serve.batch(
            max_batch_size=self.args.max_batch_size,
            batch_wait_timeout_s=self.args.batch_wait_timeout_s,
            max_concurrent_batches=self.args.max_concurrent_batches,
        )(run_batch)

    @api.get("/healthz")
    @api.get("/health", include_in_schema=False)
    async def health(self) -> dict[str, Any]:
        loaded = self.loaded
        return {
            "status": "ok",
            "model_version": loaded.choice.model_version if loaded else None,
            "queued_texts": self.queued,
        }

    @api.get("/metrics", include_in_schema=False)
    async def prometheus(self) -> Response:
        self.metrics.queued.set(self.queued)
        return Response(self.metrics.exposition(), media_type="text/plain; version=0.0.4")

    @api.get("/v1/model")
    @api.get("/metadata", include_in_schema=False)
    async def metadata(self) -> dict[str, Any]:
        loaded = self._current()
        tags = dict(loaded.version.tags or {})
        return {
            "model": loaded.choice.model_uri,
            "name": loaded.choice.model_name,
            "version": loaded.choice.model_version,
            "task": loaded.meta.task,
            "labels": loaded.labels,
            "weights": loaded.meta.weights,
            "quantization": tags.get("lepton.quantization", "none"),
            "max_length": loaded.meta.max_length,
            "cleaning": loaded.meta.cleaning,
            "loaded_at": loaded.loaded_at,
            "lineage": {k: v for k, v in tags.items() if k.startswith("lepton.")},
            "max_texts_per_request": self.args.max_texts_per_request,
            "max_chars_per_text": self.args.max_chars_per_text,
            "max_batch_size": self.args.max_batch_size,
            "max_queued_texts": self.args.max_queued_texts,
        }

    @api.post("/v1/predict", response_model=PredictResponse)
    @api.post("/predict", response_model=PredictResponse, include_in_schema=False)
    async def predict(self, request: PredictRequest) -> PredictResponse:
        texts = request.texts
        check_texts(texts, self.args.max_texts_per_request, self.args.max_chars_per_text)
        self._current()
        if self.queued and self.queued + len(texts) > self.args.max_queued_texts:
            raise self._shed(f"{self.queued} texts already wait for the model")
        self.queued += len(texts)
        if self.args.adaptive_batch_wait:
            # Alone in the replica: nothing can join this batch, so waiting only adds latency.
            alone = self.queued == len(texts)
            self._batch.set_batch_wait_timeout_s(0.0 if alone else self.args.batch_wait_timeout_s)
        try:
            return await self._answer(texts)
        finally:
            self.queued -= len(texts)

    async def _answer(self, texts: list[str]) -> PredictResponse:
        while True:
            results = await asyncio.gather(*(self._batch(t) for t in texts))
            # The texts of one request may fall into batches on either side of a swap:
            # then ask again, so that every answer comes from one model.
            if len({choice.model_uri for _, choice in results}) == 1:
                break
        for i, (result, _) in enumerate(results):
            if isinstance(result, _TextFailed):
                raise HTTPException(500, f"texts.{i}: the model failed on this text ({result})")
        choice = results[0][1]
        answers = [r for r, _ in results]
        self.samples.record(texts, answers, choice.model_version)
        return PredictResponse(
            predictions=answers, model=choice.model_uri, model_version=choice.model_version
        )

    async def _run_batch(self, texts: list[str]) -> list[tuple[Any, ModelChoice]]:
        loaded = self._current()  # the whole batch runs on this one model
        self.metrics.batch.observe(len(texts))
        started = time.perf_counter()
        # On the event loop, on purpose: in a worker thread the forward pass and the loop
        # fight over the GIL, and 32 clients got half the throughput (benchmarks/RESULTS.md).
        # The loop waits one batch at most, so /healthz still answers within a batch's time.
        answers = _classify_isolated(loaded, texts)
        self.metrics.forward.observe(time.perf_counter() - started)
        return [(r, loaded.choice) for r in answers]


def build_app(
    args: ServeArgs,
    host: str | None,
    num_replicas: int = 1,
    num_cpus: float = 1.0,
    max_ongoing_requests: int | None = None,
    max_queued_requests: int | None = None,
    access_log: bool = False,
    deployment=None,
):
    """The Serve application for ``args``, behind Serve's HTTP proxy on ``host``:
    ``deployment`` (default ``TextClassifier``; the generation app passes its own).

    Off loopback (or on an unknown host) ``args`` must carry an API key. The model goes into ``user_config`` and the rest into the constructor, so that
    deploying another version of the same model later swaps it in place. Ray Serve's
    per-replica slots default to enough for every queued text plus room for ``/healthz``
    and uploads in flight; its router queue beyond them answers 503 with ``Retry-After``.
    """
    from ray.serve.config import BackpressureConfig

    from lepton_ray.config import serve_slots

    check_exposure(host, args)
    choice = ModelChoice.model_validate({k: getattr(args, k) for k in MODEL_FIELDS})
    ongoing, queued = serve_slots(args.max_queued_texts, max_ongoing_requests, max_queued_requests)
    return (
        (deployment or TextClassifier)
        .options(
            num_replicas=num_replicas,
            ray_actor_options={"num_cpus": num_cpus},
            user_config=choice.model_dump(),
            max_ongoing_requests=ongoing,
            max_queued_requests=queued,
            backpressure_config=BackpressureConfig(
                status_code=503, retry_after_s=args.retry_after_s
            ),
            logging_config={"enable_access_log": access_log},
        )
        .bind(args.model_dump(exclude=set(MODEL_FIELDS)))
    )


def app_builder(args: ServeArgs):
    """One-argument builder for Serve config files (``import_path: ...app:app_builder``,
    as the KubeRay RayService manifest uses); ``args`` are validated as ``ServeArgs``.

    The key's digest is ``api_key_sha256``, or read from the variable
    ``api_key_sha256_env`` names; it is required unless Serve's proxy listens on loopback
    (KubeRay binds it to 0.0.0.0)."""
    if args.api_key_sha256 is None and args.api_key_sha256_env:
        name = args.api_key_sha256_env
        digest = os.environ.get(name, "").strip().lower()
        if not digest:
            raise ValueError(
                f"api_key_sha256_env is {name}, but {name} is not set on this node: set it "
                "from the Secret that holds the key's SHA-256"
            )
        args = ServeArgs.model_validate({**args.model_dump(), "api_key_sha256": digest})
    return build_app(args, host=_proxy_host())


def _proxy_host() -> str | None:
    """The host Serve's HTTP proxy on the connected cluster listens on (None: unknown)."""
    import ray

    if not ray.is_initialized():
        return None
    try:
        from ray.serve.context import _get_global_client

        return _get_global_client().http_config.host
    except Exception:  # noqa: BLE001 - no Serve to ask: unknown, which needs a key
        return None
