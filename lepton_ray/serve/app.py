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
one whole model, and no request fails or waits for a gap during the swap.
"""

import asyncio
import os
import time
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

api = FastAPI(title="lepton-ray", description="Text classification served by lepton-ray.")


class ServeArgs(BaseModel):
    """Everything a replica needs to find and run its model."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    tracking_uri: str
    model_uri: str | None = Field(None, description="The pinned version: models:/NAME/VERSION.")
    model_name: str | None = None
    model_version: str | None = None
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.005
    max_texts_per_request: int = 256
    max_chars_per_text: int = 20_000
    torch_threads: int | None = None


MODEL_FIELDS = ("model_uri", "model_name", "model_version")


class ModelChoice(BaseModel):
    """The replica's ``user_config``: which registered version it serves."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_uri: str
    model_name: str
    model_version: str


class _Loaded:
    """One whole loaded model; a replica switches between these, never edits one."""

    def __init__(self, tracking_uri: str, choice: ModelChoice):
        from lepton_ray.models import load_model_artifact
        from lepton_ray.tracking.mlflow import download_model, get_model_version

        self.choice = choice
        folder = download_model(tracking_uri, choice.model_uri)
        self.model, self.tokenizer, self.meta = load_model_artifact(folder)
        self.version = get_model_version(tracking_uri, choice.model_uri)
        self.labels = list(self.meta.labels)
        self.loaded_at = time.time()


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


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message}, headers=headers)


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
        # FastAPI's words for a body that is not UTF-8 (or not decodable at all).
        detail = "body: not valid UTF-8 JSON"
    return _error(exc.status_code, detail, getattr(exc, "headers", None))


@api.exception_handler(Exception)
async def _crash(_: Request, exc: Exception) -> JSONResponse:
    return _error(500, f"internal error: {type(exc).__name__}")


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
        self._swap = asyncio.Lock()
        self._predict_batch.set_max_batch_size(self.args.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve the version in ``config``: load it beside the current one, then switch."""
        choice = ModelChoice.model_validate(config)
        async with self._swap:
            if self.loaded is not None and self.loaded.choice == choice:
                return
            # In a thread: the event loop keeps answering with the current model meanwhile.
            self.loaded = await asyncio.to_thread(_Loaded, self.args.tracking_uri, choice)

    def _current(self) -> _Loaded:
        if self.loaded is None:
            raise HTTPException(503, "no model loaded yet", headers={"Retry-After": "1"})
        return self.loaded

    @api.get("/healthz")
    @api.get("/health", include_in_schema=False)
    async def health(self) -> dict[str, str | None]:
        loaded = self.loaded
        return {"status": "ok", "model_version": loaded.choice.model_version if loaded else None}

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
        }

    @api.post("/v1/predict", response_model=PredictResponse)
    @api.post("/predict", response_model=PredictResponse, include_in_schema=False)
    async def predict(self, request: PredictRequest) -> PredictResponse:
        texts = request.texts
        check_texts(texts, self.args.max_texts_per_request, self.args.max_chars_per_text)
        self._current()
        results = await asyncio.gather(*(self._predict_batch(t) for t in texts))
        for i, (result, _) in enumerate(results):
            if isinstance(result, _TextFailed):
                raise HTTPException(500, f"texts.{i}: the model failed on this text ({result})")
        # The texts of one request may fall into batches on either side of a swap.
        choices = {choice.model_uri: choice for _, choice in results}
        choice = results[-1][1]
        if len(choices) > 1:
            return await self.predict(request)  # answer from one model only
        return PredictResponse(
            predictions=[r for r, _ in results],
            model=choice.model_uri,
            model_version=choice.model_version,
        )

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _predict_batch(self, texts: list[str]) -> list[tuple[Any, ModelChoice]]:
        loaded = self._current()  # the whole batch runs on this one model
        return [(r, loaded.choice) for r in _classify_isolated(loaded, texts)]


def build_app(args: ServeArgs, num_replicas: int = 1, num_cpus: float = 1.0):
    """The Serve application for ``args`` (typed app builder).

    The model goes into ``user_config`` and the rest into the constructor, so that
    deploying another version of the same model later swaps it in place.
    """
    choice = ModelChoice.model_validate({k: getattr(args, k) for k in MODEL_FIELDS})
    return TextClassifier.options(
        num_replicas=num_replicas,
        ray_actor_options={"num_cpus": num_cpus},
        user_config=choice.model_dump(),
    ).bind(args.model_dump(exclude=set(MODEL_FIELDS)))


def app_builder(args: ServeArgs):
    """One-argument builder for Serve config files (``import_path: ...app:app_builder``,
    as the KubeRay RayService manifest uses); ``args`` are validated as ``ServeArgs``."""
    return build_app(args)
