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
"""

import asyncio
import hashlib
import hmac
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from lepton_ray.config import _is_loopback
from lepton_ray.tracking.mlflow import _URI_CREDENTIALS

api = FastAPI(title="lepton-ray", description="Text classification served by lepton-ray.")


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
        from lepton_ray.models import load_model_artifact
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


def _error(
    status: int, message: str, headers: dict[str, str] | None = None, code: str | None = None
) -> JSONResponse:
    content = {"error": message} | ({"code": code} if code else {})
    return JSONResponse(status_code=status, content=content, headers=headers)


class _Refusal(HTTPException):
    """An HTTP error whose JSON also carries a machine-readable ``code``."""

    def __init__(self, status: int, message: str, code: str, headers: dict[str, str]):
        super().__init__(status, message, headers=headers)
        self.code = code


def _unparsable(cause: BaseException | None) -> str:
    """What is wrong with a body FastAPI could not parse (it says only 'error parsing')."""
    if isinstance(cause, RecursionError):
        return "body: JSON nested too deep"
    if isinstance(cause, UnicodeDecodeError):
        return f"body: not valid UTF-8 (byte {cause.start})"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return f"body: a number too large (over {sys.get_int_max_str_digits()} digits)"
    return "body: not valid JSON"


@api.exception_handler(RequestValidationError)
async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return _error(422, "body: not valid JSON")
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    return _error(422, f"{where}: {first.get('msg')}")


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = str(exc.detail)
    if exc.status_code == 400 and "parsing the body" in detail:
        detail = _unparsable(exc.__cause__)
    return _error(
        exc.status_code, detail, getattr(exc, "headers", None), getattr(exc, "code", None)
    )


@api.exception_handler(Exception)
async def _crash(_: Request, exc: Exception) -> JSONResponse:
    return _error(500, f"internal error: {type(exc).__name__}")


def key_digest(key: str) -> str:
    """What a replica keeps of the API key: its SHA-256, never the key itself."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class _Metrics:
    """The replica's Prometheus series, in a registry of its own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lepton_serve_requests",
            "HTTP requests answered by this replica.",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lepton_serve_request_seconds",
            "Seconds from request to response, by route.",
            ["route"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.batch = Histogram(
            "lepton_serve_batch_texts",
            "Texts per forward pass.",
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.forward = Histogram(
            "lepton_serve_batch_seconds",
            "Seconds per batch in the model (cleaning, tokenizing, forward pass).",
            registry=self.registry,
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
        )
        self.shed = Counter(
            "lepton_serve_shed_requests",
            "Requests refused with 503 because max_queued_texts were already waiting.",
            registry=self.registry,
        )
        self.queued = Gauge(
            "lepton_serve_queued_texts",
            "Texts held for the model now (running or waiting).",
            registry=self.registry,
        )
        self.body_bytes = Gauge(
            "lepton_serve_body_bytes_in_flight",
            "Bytes of the request bodies admitted and not yet answered.",
            registry=self.registry,
        )
        self.body_bytes_peak = Gauge(
            "lepton_serve_body_bytes_in_flight_peak",
            "The most body bytes ever in flight at once (never above max_body_bytes_in_flight).",
            registry=self.registry,
        )
        self.model = Gauge(
            "lepton_serve_model_info",
            "1 for the registered version being served.",
            ["model", "version"],
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _ReplicaState:
    """What the middleware needs of its replica (one replica per process)."""

    settings: ServeArgs | None = None
    metrics: _Metrics | None = None
    body_bytes: int = 0  # of the bodies admitted and not yet answered
    body_bytes_peak: int = 0

    def hold_bytes(self, n: int) -> bool:
        """Admit ``n`` more body bytes if they fit within max_body_bytes_in_flight."""
        if self.body_bytes + n > self.settings.max_body_bytes_in_flight:
            return False
        self.body_bytes += n
        self.body_bytes_peak = max(self.body_bytes_peak, self.body_bytes)
        self.metrics.body_bytes.set(self.body_bytes)
        self.metrics.body_bytes_peak.set(self.body_bytes_peak)
        return True

    def release_bytes(self, n: int) -> None:
        self.body_bytes -= n
        self.metrics.body_bytes.set(self.body_bytes)


_replica = _ReplicaState()
NOT_READY = "not_ready"


class _Guard:
    """Pure ASGI middleware in front of every route: readiness, API key, bounded bodies, metrics.

    Before the replica is ready, every request gets 503 (nothing passes unchecked). A body is
    admitted before it is read, within ``max_body_bytes_in_flight``, then read here, whole
    and within ``body_timeout_s``, before any route runs; a client that stalls mid-upload
    gets 408 and holds nothing afterwards.
    """

    OPEN = ("/healthz", "/health")

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings, metrics = _replica.settings, _replica.metrics
        if settings is None or metrics is None:
            refusal = (503, "the replica is not ready yet", {"Retry-After": "1"}, NOT_READY)
            await _error(*refusal)(scope, receive, send)
            return
        started = time.perf_counter()
        route = _route_label(scope)
        status = {"code": 500}
        held = [0]  # body bytes this request holds

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope, route, settings)
            if refusal is None and scope["method"] in ("POST", "PUT", "PATCH"):
                body, refusal = await _read_body(scope, receive, settings, held)
                if refusal is None:
                    receive = _replay(body, receive)
            if refusal is not None:
                await _error(*refusal)(scope, receive, send_counted)
            else:
                await self.app(scope, receive, send_counted)
        finally:
            _replica.release_bytes(held[0])
            metrics.requests.labels(route, str(status["code"])).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - started)

    def _refusal(self, scope, route: str, settings: ServeArgs) -> tuple | None:
        if settings.api_key_sha256 is None or route in self.OPEN:
            return None
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            key_digest(key.strip()), settings.api_key_sha256
        ):
            return (
                401,
                "missing or wrong API key: send 'Authorization: Bearer KEY'",
                {"WWW-Authenticate": "Bearer"},
            )
        return None


_ROUTES = {
    "/v1/predict",
    "/predict",
    "/healthz",
    "/health",
    "/v1/model",
    "/metadata",
    "/metrics",
    "/docs",
    "/openapi.json",
}


def _route_label(scope) -> str:
    """The route below the app's prefix (the path holds it, root_path names it), as the
    metrics label it; anything else is 'other' (bounded label cardinality)."""
    path = scope["path"]
    root = (scope.get("root_path") or "").rstrip("/")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    path = path.rstrip("/") or "/"
    return path if path in _ROUTES else "other"


def _declared_length(scope) -> int | None:
    value = dict(scope.get("headers") or []).get(b"content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


async def _read_body(
    scope, receive, settings: ServeArgs, held: list[int]
) -> tuple[bytes, tuple | None]:
    """The whole body, or why not; ``held[0]`` counts the bytes it holds of the replica's
    ``max_body_bytes_in_flight`` (reserved from ``Content-Length`` before reading)."""
    cap = settings.max_body_bytes_in_flight
    limit = min(6 * settings.max_texts_per_request * settings.max_chars_per_text + 65_536, cap)
    too_large = (413, f"request body over {limit} bytes", {"Connection": "close"})
    busy = (
        503,
        f"overloaded: request bodies of {_replica.body_bytes} bytes are already in flight "
        f"(max_body_bytes_in_flight {cap}); retry later",
        {"Retry-After": str(settings.retry_after_s), "Connection": "close"},
        "overloaded_bytes",
    )
    declared = _declared_length(scope)
    if declared is not None:
        if declared > limit:
            return b"", too_large
        if not _replica.hold_bytes(declared):
            return b"", busy
        held[0] = declared
    deadline = time.monotonic() + settings.body_timeout_s
    chunks, size = [], 0
    while True:
        left = deadline - time.monotonic()
        try:
            message = await asyncio.wait_for(receive(), timeout=max(left, 0.0))
        except TimeoutError:
            return b"", (
                408,
                f"the request body did not arrive within {settings.body_timeout_s:g} s",
                {"Connection": "close"},
            )
        if message["type"] == "http.disconnect":
            return b"", (400, "the client disconnected before sending the whole body", {})
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return b"", too_large
        if size > held[0]:  # no (or a short) Content-Length: hold the bytes as they come
            if not _replica.hold_bytes(size - held[0]):
                return b"", busy
            held[0] = size
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), None


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then the real stream: a disconnect, if one comes

    return replayed


api.add_middleware(_Guard)


class _SampleLog:
    """A JSONL sample of predictions for drift checks: text hash, label, probability, version."""

    def __init__(self, path: str | None, rate: float) -> None:
        self.rate = rate if path else 0.0
        self._file = None
        if self.rate > 0:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115

    def record(self, texts: list[str], answers: list[dict[str, Any]], version: str) -> None:
        if self._file is None:
            return
        lines = []
        for text, answer in zip(texts, answers, strict=True):
            if random.random() >= self.rate:
                continue
            lines.append(
                json.dumps(
                    {
                        "time": round(time.time(), 3),
                        "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                        "chars": len(text),
                        "label": answer["label"],
                        "probability": answer["probabilities"][answer["label"]],
                        "truncated": answer["truncated"],
                        "model_version": version,
                    }
                )
                + "\n"
            )
        if lines:
            self._file.write("".join(lines))


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
    """The batch in one pass; if that fails, text by text, so only the culprit fails."""
    from lepton_ray.predict import classify

    try:
        return classify(loaded.model, loaded.tokenizer, loaded.meta, texts)
    except Exception:  # noqa: BLE001 - find the culprit; its batch-mates still get answers
        out: list[dict[str, Any] | _TextFailed] = []
        for text in texts:
            try:
                out.extend(classify(loaded.model, loaded.tokenizer, loaded.meta, [text]))
            except Exception as err:  # noqa: BLE001
                out.append(_TextFailed(type(err).__name__))
        return out


# (Above the class: Serve serializes the class when it is decorated.)


@serve.deployment(name="TextClassifier", ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class TextClassifier:
    def __init__(self, args: dict[str, Any]):
        import torch

        self.args = ServeArgs.model_validate(args)
        torch.set_num_threads(self.args.torch_threads or max(1, os.cpu_count() or 1))
        self.loaded: _Loaded | None = None  # set by reconfigure (build_app's user_config)
        self.models_root = Path(tempfile.mkdtemp(prefix="lepton-serve-"))  # one folder per model
        self._swap = asyncio.Lock()
        self.metrics = _Metrics()
        # Through the imported module: Serve ships this class by value, with copies of the
        # module globals its methods name; the middleware reads the module's own.
        from lepton_ray.serve import app as this_module

        this_module._replica.settings = self.args
        this_module._replica.metrics = self.metrics
        self.samples = _SampleLog(self.args.log_sample_path, self.args.log_sample_rate)
        self.queued = 0  # texts admitted and not yet answered

        async def run_batch(texts: list[str]) -> list[tuple[Any, ModelChoice]]:
            return await self._run_batch(texts)

        self._batch = serve.batch(
            max_batch_size=self.args.max_batch_size,
            batch_wait_timeout_s=self.args.batch_wait_timeout_s,
            max_concurrent_batches=self.args.max_concurrent_batches,
        )(run_batch)

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve the version in ``config``: load it beside the current one, then switch."""
        choice = ModelChoice.model_validate(config)
        async with self._swap:
            if self.loaded is not None and self.loaded.choice == choice:
                return
            # In a thread: the event loop keeps answering with the current model meanwhile.
            loaded = await asyncio.to_thread(
                _Loaded, self.args.mlflow_uri(), choice, self.models_root
            )
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

    def _current(self) -> _Loaded:
        if self.loaded is None:
            raise _Refusal(503, "no model loaded yet", NOT_READY, {"Retry-After": "1"})
        return self.loaded

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
            self.metrics.shed.inc()
            raise _Refusal(
                503,
                f"overloaded: {self.queued} texts already wait for the model "
                f"(max_queued_texts {self.args.max_queued_texts}); retry later",
                "overloaded",
                {"Retry-After": str(self.args.retry_after_s)},
            )
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


def check_exposure(host: str | None, args: ServeArgs) -> None:
    """Refuse to serve without an API key on anything but loopback (``None``: unknown)."""
    if args.api_key_sha256 is None and (host is None or not _is_loopback(host)):
        where = f"on {host}, which other machines reach" if host else "on an unknown host"
        raise ValueError(
            f"the endpoint would listen {where}, with no API key: set serve.api_key_env "
            "(lepton-ray serve), or api_key_sha256 / api_key_sha256_env in the application's "
            "args (a Serve config file such as cluster/kuberay/rayservice.yaml)"
        )


def build_app(
    args: ServeArgs,
    host: str | None,
    num_replicas: int = 1,
    num_cpus: float = 1.0,
    max_ongoing_requests: int | None = None,
    max_queued_requests: int | None = None,
    access_log: bool = False,
):
    """The Serve application for ``args``, behind Serve's HTTP proxy on ``host``.

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
    return TextClassifier.options(
        num_replicas=num_replicas,
        ray_actor_options={"num_cpus": num_cpus},
        user_config=choice.model_dump(),
        max_ongoing_requests=ongoing,
        max_queued_requests=queued,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=args.retry_after_s),
        logging_config={"enable_access_log": access_log},
    ).bind(args.model_dump(exclude=set(MODEL_FIELDS)))


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
