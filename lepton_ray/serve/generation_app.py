"""The OpenAI-compatible generation API on Ray Serve, for the causal LMs lepton-ray trains.

Routes: ``POST /v1/chat/completions`` (messages), ``POST /v1/completions`` (a prompt),
``GET /v1/models`` (the served registered version), ``/healthz`` and ``/metrics``. Requests
and answers take OpenAI's shapes, so the ``openai`` package, ``curl -N`` and any
OpenAI-compatible client work unchanged; ``stream: true`` answers Server-Sent Events in
OpenAI's chunk format, each chunk sent as its tokens are generated, ending with
``data: [DONE]``. A client that goes away stops its generation at the next step.

Every prompt is rendered by the template that travels in the artifact (the task's
``prompt_ids``, the same code as batch prediction and the MLflow pyfunc), after the
artifact's own template digest is checked (fail closed). Generation runs in ``engine``:
iteration-level batching across requests, on the replica's event loop between requests.

Everything ``/v1/predict`` has stays: the API key (``Authorization: Bearer KEY``), body
admission and 408 for slow bodies (``guards``), 503 with ``Retry-After`` when
``max_queued_texts`` sequences are already queued or running, zero-drop swaps pinned by
version (a new version gets a new engine; sequences running on the old one finish on it),
the sample log (hashes and counts, never texts) and 127.0.0.1 by default. Every error is
in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: a limit, a malformed
body or a wrong type is a 400.
"""

import collections
import json
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from lepton_ray.serve.app import ModelChoice, ServeArgs, _Loaded, _Replica
from lepton_ray.serve.guards import (
    _crash,
    _Guard,
    _http_error,
    _Refusal,
    openai_error,
)

api = FastAPI(
    title="lepton-ray", description="Text generation served by lepton-ray (OpenAI-compatible)."
)


async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    """A malformed body or a wrong type: 400 in OpenAI's shape, naming the field."""
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return JSONResponse(status_code=400, content=openai_error(400, "body: not valid JSON"))
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    message = f"{where or 'body'}: {first.get('msg')}"
    return JSONResponse(status_code=400, content=openai_error(400, message, param=where))


api.add_exception_handler(RequestValidationError, _invalid)
api.add_exception_handler(StarletteHTTPException, _http_error)
api.add_exception_handler(Exception, _crash)
api.add_middleware(_Guard)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: str
    content: str


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, protected_namespaces=())

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(1, ge=1)
    stream_options: dict[str, Any] | None = None


class ChatRequest(_Sampling):
    messages: list[Message]


class CompletionRequest(_Sampling):
    prompt: str | list[str]


def _bad(message: str, param: str | None, code: str | None = None) -> _Refusal:
    return _Refusal(400, message, code or "invalid_value", {}, param)


class _Generating(_Loaded):
    """A loaded causal LM with its engine; refuses a model this app cannot serve."""

    def __init__(self, tracking_uri: str, choice: ModelChoice, root: Path, batch_size: int):
        from lepton_ray.artifacts import unmerged_refusal
        from lepton_ray.serve.engine import artifact_engine

        super().__init__(tracking_uri, choice, root)
        try:
            if self.task.serving != "generate":
                raise ValueError(
                    f"{choice.model_uri} is a '{self.meta.task}' model: it is served by "
                    "/v1/predict, not the generation API"
                )
            self.task.check_tokenizer(self.tokenizer, self.meta)  # fail closed
            why_not = unmerged_refusal(
                self.meta, "the generation engine (it drives its own KV cache)"
            )
            if why_not:
                raise ValueError(f"{choice.model_uri}: {why_not}")
        except BaseException:
            self.remove()
            raise
        self.engine = artifact_engine(self.model, self.tokenizer, self.meta, batch_size)


class _Reply:
    """OpenAI's response and chunk shapes for one request."""

    def __init__(self, loaded: _Generating, chat: bool, prompt_tokens: int):
        self.loaded = loaded
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = loaded.choice.model_name
        self.prompt_tokens = prompt_tokens

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, text: str, last) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
        choice["finish_reason"] = last.finish_reason
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            **self._head(kind),
            "choices": [choice],
            "usage": self.usage(last.completion_tokens),
        }

    def chunk(self, text: str = "", role: bool = False, finish: str | None = None) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, completion_tokens: int) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(kind), "choices": [], "usage": self.usage(completion_tokens)}

    @staticmethod
    def sse(body: dict) -> str:
        return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


@serve.deployment(name="TextGenerator", ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class TextGenerator(_Replica):
    openai_errors = True

    def __init__(self, args: dict[str, Any]):
        super().__init__(args)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    def _load(self, choice: ModelChoice) -> _Generating:
        """The version and its engine; sequences running on the old engine finish on it."""
        args = self.args
        return _Generating(args.mlflow_uri(), choice, self.models_root, args.generation_batch_size)

    @api.get("/healthz")
    @api.get("/health", include_in_schema=False)
    async def health(self) -> dict[str, Any]:
        loaded = self.loaded
        engine = loaded.engine if loaded else None
        return {
            "status": "ok",
            "model_version": loaded.choice.model_version if loaded else None,
            "waiting": engine.queue_length if engine else 0,
            "running": len(engine.running) if engine else 0,
        }

    @api.get("/metrics", include_in_schema=False)
    async def prometheus(self) -> Response:
        engine = self.loaded.engine if self.loaded else None
        self.metrics.waiting.set(engine.queue_length if engine else 0)
        self.metrics.running.set(len(engine.running) if engine else 0)
        now = time.monotonic()
        while self._recent and self._recent[0][0] < now - 10.0:
            self._recent.popleft()
        self.metrics.tokens_per_s.set(sum(n for _, n in self._recent) / 10.0)
        return Response(self.metrics.exposition(), media_type="text/plain; version=0.0.4")

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        loaded = self._current()
        return {"object": "list", "data": [self._model_card(loaded)]}

    def _model_card(self, loaded: _Generating) -> dict[str, Any]:
        tags = dict(loaded.version.tags or {})
        return {
            "id": loaded.choice.model_name,
            "object": "model",
            "created": int(loaded.loaded_at),
            "owned_by": "lepton-ray",
            "version": loaded.choice.model_version,
            "uri": loaded.choice.model_uri,
            "weights": loaded.meta.weights,
            "quantization": tags.get("lepton.quantization", "none"),
            "max_context": loaded.engine.max_context,
            "max_tokens_limit": self.args.max_tokens_limit,
        }

    @api.post("/v1/chat/completions")
    async def chat(self, request: ChatRequest):
        if not request.messages:
            raise _bad("messages: give at least one message", "messages")
        turns = [m.model_dump() for m in request.messages]
        return await self._generate(request, turns, "messages", chat=True)

    @api.post("/v1/completions")
    async def complete(self, request: CompletionRequest):
        prompt = request.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise _bad("prompt: give one prompt (a string, or a list of one)", "prompt")
            prompt = prompt[0]
        return await self._generate(request, prompt, "prompt", chat=False)

    # ------------------------------------------------------------------ the work
    def _check(self, request: _Sampling, loaded: _Generating) -> int:
        """The request's max_tokens, or a 400/404 naming what is wrong."""
        names = {
            loaded.choice.model_name,
            loaded.choice.model_uri,
            f"{loaded.choice.model_name}/{loaded.choice.model_version}",
        }
        if request.model is not None and request.model not in names:
            raise _Refusal(
                404,
                f"model: '{request.model}' is not served here; this endpoint serves "
                f"'{loaded.choice.model_name}' (version {loaded.choice.model_version})",
                "model_not_found",
                {},
                "model",
            )
        if request.n != 1:
            raise _bad("n: only n=1 is supported (one choice per request)", "n")
        asked = request.max_completion_tokens or request.max_tokens
        limit = self.args.max_tokens_limit
        if asked is not None and asked > limit:
            raise _bad(
                f"max_tokens: {asked} is over this endpoint's limit of {limit} "
                "(serve.max_tokens_limit)",
                "max_tokens",
            )
        return asked or min(self.args.default_max_tokens, limit)

    async def _generate(self, request: _Sampling, prompt: Any, field: str, chat: bool):
        from lepton_ray.serve.engine import SamplingParams

        loaded = self._current()
        max_tokens = self._check(request, loaded)
        try:
            ids = loaded.task.prompt_ids(loaded.tokenizer, loaded.meta, prompt)
        except ValueError as err:
            raise _bad(f"{field}: {err}", field) from None
        engine = loaded.engine
        if len(ids) + max_tokens > engine.max_context:
            raise _bad(
                f"{field}: the prompt's {len(ids)} tokens plus max_tokens {max_tokens} are "
                f"over the model's context of {engine.max_context} tokens",
                field,
                "context_length_exceeded",
            )
        held = engine.queue_length + len(engine.running)
        if held >= self.args.max_queued_texts:
            raise self._shed(f"{held} requests already wait for or run in the model")
        stop = request.stop
        stops = tuple(s for s in ([stop] if isinstance(stop, str) else stop or []) if s)
        params = SamplingParams(max_tokens, request.temperature, request.top_p, stops, request.seed)
        seq = engine.submit(ids, params)
        reply = _Reply(loaded, chat, len(ids))
        if request.stream:
            include_usage = bool((request.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                self._stream(engine, seq, reply, include_usage, prompt),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        events = []
        try:
            async for event in engine.events(seq):
                events.append(event)
        finally:
            self._abandoned(engine, seq, events)
        last = events[-1]
        if last.error:
            raise _Refusal(
                500, f"the model failed on this request ({last.error})", "model_error", {}
            )
        self._done(seq, prompt, loaded)
        return reply.whole("".join(e.text for e in events), last)

    async def _stream(self, engine, seq, reply: _Reply, include_usage: bool, prompt):
        events = []
        try:
            yield reply.sse(reply.chunk(role=True))
            async for event in engine.events(seq):
                events.append(event)
                if event.error:
                    body = openai_error(500, f"the model failed ({event.error})", "model_error")
                    yield reply.sse(body)
                    break
                if event.text:
                    yield reply.sse(reply.chunk(text=event.text))
                if event.finish_reason is not None:
                    yield reply.sse(reply.chunk(finish=event.finish_reason))
                    if include_usage:
                        yield reply.sse(reply.usage_chunk(event.completion_tokens))
                    self._done(seq, prompt, reply.loaded)
            yield "data: [DONE]\n\n"
        finally:
            self._abandoned(engine, seq, events)

    def _abandoned(self, engine, seq, events: list) -> None:
        """Stop generating for a request whose client went away before its last event."""
        if not events or events[-1].finish_reason is None:
            engine.cancel(seq)
            self.metrics.cancelled.inc()

    def _done(self, seq, prompt: Any, loaded: _Generating) -> None:
        self.metrics.generated.inc(seq.completion_tokens)
        self._recent.append((time.monotonic(), seq.completion_tokens))
        if seq.first_token_s is not None:
            self.metrics.first_token.observe(seq.first_token_s)
        answer = {
            "prompt_tokens": len(seq.prompt),
            "completion_tokens": seq.completion_tokens,
            "finish_reason": seq.finish_reason,
            "time_to_first_token_s": round(seq.first_token_s or 0.0, 4),
        }
        text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
        self.samples.record_generation(text, answer, loaded.choice.model_version)


def build_generation_app(args: ServeArgs, host: str | None, **options):
    """The generation application for ``args``: ``app.build_app``'s with this deployment."""
    from lepton_ray.serve.app import build_app

    return build_app(args, host, deployment=TextGenerator, **options)
