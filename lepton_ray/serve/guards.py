"""The HTTP guards every serving app puts in front of its routes.

An app registers the exception handlers (``_invalid_request``, ``_http_error``, ``_crash``)
and the middleware (``_Guard``) on its FastAPI object, and its replica fills ``_replica``
(settings and metrics) when it starts:

- until then every request gets 503 (``"code": "not_ready"``), so no request passes the
  API key unchecked; with a key (``api_key_sha256``) every route but ``/healthz`` needs
  ``Authorization: Bearer KEY`` (401 otherwise), compared by digest in constant time;
- a request is admitted before its body is read: the bytes of the bodies a replica holds
  (announced by ``Content-Length``, else counted as they arrive) stay within
  ``max_body_bytes_in_flight``, and one more gets 503 (``"code": "overloaded_bytes"``)
  with ``Retry-After`` at once; a body over the per-request limit gets 413;
- a request body must arrive within ``body_timeout_s`` (408 otherwise), read whole here
  before any route runs;
- every error is JSON ``{"error": ...}``, with a ``code`` where a refusal carries one (the
  generation app's are in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``);
- ``check_exposure`` refuses to build an app without an API key off loopback.
"""

import asyncio
import hashlib
import hmac
import sys
import time
from typing import Protocol

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lepton_ray.config import is_loopback
from lepton_ray.serve.metrics import _Metrics


class GuardSettings(Protocol):
    """What the guards read of an app's deployment arguments (``ServeArgs`` has them)."""

    api_key_sha256: str | None
    retry_after_s: int
    body_timeout_s: float
    max_body_bytes_in_flight: int
    max_texts_per_request: int
    max_chars_per_text: int


def _error(
    status: int,
    message: str,
    headers: dict[str, str] | None = None,
    code: str | None = None,
    param: str | None = None,
) -> JSONResponse:
    if _replica.openai_errors:
        content = openai_error(status, message, code, param)
    else:
        content = {"error": message} | ({"code": code} if code else {})
    return JSONResponse(status_code=status, content=content, headers=headers)


OPENAI_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}


def openai_error(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> dict:
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``; ``param``
    defaults to the field a ``"field: problem"`` message names."""
    if param is None and ": " in message and status in (400, 413, 422):
        head = message.split(": ", 1)[0]
        param = head if head.replace(".", "").replace("_", "").isalnum() else None
    kind = OPENAI_ERROR_TYPES.get(status)
    if kind is None:
        kind = "server_error" if status >= 500 else "invalid_request_error"
    if status == 503:
        kind = "overloaded_error" if code and code.startswith("overloaded") else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Refusal(HTTPException):
    """An HTTP error whose JSON also carries a machine-readable ``code``."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        headers: dict[str, str],
        param: str | None = None,
    ):
        super().__init__(status, message, headers=headers)
        self.code = code
        self.param = param  # the request field at fault (OpenAI's error shape)


def _unparsable(cause: BaseException | None) -> str:
    """What is wrong with a body FastAPI could not parse (it says only 'error parsing')."""
    if isinstance(cause, RecursionError):
        return "body: JSON nested too deep"
    if isinstance(cause, UnicodeDecodeError):
        return f"body: not valid UTF-8 (byte {cause.start})"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return f"body: a number too large (over {sys.get_int_max_str_digits()} digits)"
    return "body: not valid JSON"


async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return _error(422, "body: not valid JSON")
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    return _error(422, f"{where}: {first.get('msg')}")


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = str(exc.detail)
    if exc.status_code == 400 and "parsing the body" in detail:
        detail = _unparsable(exc.__cause__)
    return _error(
        exc.status_code,
        detail,
        getattr(exc, "headers", None),
        getattr(exc, "code", None),
        getattr(exc, "param", None),
    )


async def _crash(_: Request, exc: Exception) -> JSONResponse:
    return _error(500, f"internal error: {type(exc).__name__}")


def key_digest(key: str) -> str:
    """What a replica keeps of the API key: its SHA-256, never the key itself."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class _ReplicaState:
    """What the middleware needs of its replica (one replica per process)."""

    settings: GuardSettings | None = None
    metrics: _Metrics | None = None
    openai_errors: bool = False  # the generation app answers errors in OpenAI's shape
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

    def _refusal(self, scope, route: str, settings: GuardSettings) -> tuple | None:
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
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
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
    scope, receive, settings: GuardSettings, held: list[int]
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


def check_exposure(host: str | None, args: GuardSettings) -> None:
    """Refuse to serve without an API key on anything but loopback (``None``: unknown)."""
    if args.api_key_sha256 is None and (host is None or not is_loopback(host)):
        where = f"on {host}, which other machines reach" if host else "on an unknown host"
        raise ValueError(
            f"the endpoint would listen {where}, with no API key: set serve.api_key_env "
            "(lepton-ray serve), or api_key_sha256 / api_key_sha256_env in the application's "
            "args (a Serve config file such as cluster/kuberay/rayservice.yaml)"
        )
