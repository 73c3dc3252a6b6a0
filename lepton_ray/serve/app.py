"""A FastAPI ingress on a Ray Serve deployment, built from typed arguments.

Serve never imports train or tune: it loads a registered artifact through ``models`` and
``tracking``. Requests are validated (4xx with a JSON ``error``) and texts from concurrent
requests are batched into one forward pass.
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

api = FastAPI(title="lepton-ray", description="Text classification served by lepton-ray.")


class ServeArgs(BaseModel):
    """Everything a replica needs to find and run its model."""

    model_config = ConfigDict(extra="forbid")

    tracking_uri: str
    model_uri: str = Field(description="models:/NAME@ALIAS or models:/NAME/VERSION")
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.005
    max_texts_per_request: int = 256
    torch_threads: int | None = None


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[str] = Field(description="Texts to classify.")


class Prediction(BaseModel):
    label: str
    probabilities: dict[str, float]


class PredictResponse(BaseModel):
    predictions: list[Prediction]
    model: str


@api.exception_handler(RequestValidationError)
async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return JSONResponse(status_code=422, content={"error": "body: not valid JSON"})
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    return JSONResponse(status_code=422, content={"error": f"{where}: {first.get('msg')}"})


@api.exception_handler(HTTPException)
async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse(status_code=exc.status_code, content={"error": str(exc.detail)})


@serve.deployment(name="TextClassifier", ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class TextClassifier:
    def __init__(self, args: dict[str, Any]):
        import torch

        from lepton_ray.models import load_model_artifact
        from lepton_ray.tracking.mlflow import download_model

        self.args = ServeArgs.model_validate(args)
        torch.set_num_threads(self.args.torch_threads or max(1, os.cpu_count() or 1))
        folder = download_model(self.args.tracking_uri, self.args.model_uri)
        self.model, self.tokenizer, self.meta = load_model_artifact(folder)
        self.labels = list(self.meta.labels)
        self._predict_batch.set_max_batch_size(self.args.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        self.loaded_at = time.time()

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/metadata")
    async def metadata(self) -> dict[str, Any]:
        return {
            "model": self.args.model_uri,
            "task": self.meta.task,
            "labels": self.labels,
            "weights": self.meta.weights,
            "max_length": self.meta.max_length,
            "max_texts_per_request": self.args.max_texts_per_request,
        }

    @api.post("/predict", response_model=PredictResponse)
    async def predict(self, request: PredictRequest) -> PredictResponse:
        texts = request.texts
        if not texts:
            raise HTTPException(422, "texts: give at least one text")
        if len(texts) > self.args.max_texts_per_request:
            raise HTTPException(
                413,
                f"texts: {len(texts)} texts, at most {self.args.max_texts_per_request} per request",
            )
        for i, text in enumerate(texts):
            if not text.strip():
                raise HTTPException(422, f"texts.{i}: empty text")
        results = await asyncio.gather(*(self._predict_batch(t) for t in texts))
        return PredictResponse(predictions=results, model=self.args.model_uri)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _predict_batch(self, texts: list[str]) -> list[dict[str, Any]]:
        import torch

        encoded = self.tokenizer(
            texts,
            truncation=True,
            max_length=self.meta.max_length,
            padding=True,
            return_tensors="pt",
        )
        with torch.inference_mode():
            probs = torch.softmax(self.model(**encoded).logits.float(), dim=-1).tolist()
        out = []
        for row in probs:
            best = max(range(len(row)), key=row.__getitem__)
            out.append(
                {
                    "label": self.labels[best],
                    "probabilities": {label: round(p, 6) for label, p in zip(self.labels, row)},
                }
            )
        return out


def build_app(args: ServeArgs, num_replicas: int = 1, num_cpus: float = 1.0):
    """The Serve application for ``args`` (typed app builder)."""
    return TextClassifier.options(
        num_replicas=num_replicas, ray_actor_options={"num_cpus": num_cpus}
    ).bind(args.model_dump())
