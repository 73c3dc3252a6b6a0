"""Drive an endpoint: concurrent load and malformed requests (benchmarks and tests).

``run_load`` is a closed-loop load generator: ``clients`` concurrent connections, each sending
one request, waiting for its answer, then sending the next, for ``duration_s`` seconds or
``max_requests`` requests in all. ``run_stream_load`` is the same loop for the generation
API's streamed answers (Server-Sent Events), timing each content chunk. ``malformed_requests``
yields request bodies that an endpoint must refuse with a 4xx (and never a 500), mixed with
valid ones that it must answer. All use only loopback addresses the caller gives them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


class _Tally:
    """Requests sent and answered with 200, from ``statuses`` (a Counter by status)."""

    statuses: Counter
    clients: int
    seconds: float

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    def _counts(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "seconds": round(self.seconds, 2),
            "requests": self.requests,
            "ok": self.ok,
        }


@dataclass
class LoadResult(_Tally):
    clients: int
    seconds: float
    statuses: Counter = field(default_factory=Counter)  # HTTP status (or an exception's name)
    latencies_ms: list[float] = field(default_factory=list)  # of the 200 answers
    retry_after: int = 0  # 503 answers that carried Retry-After
    texts: int = 0  # texts answered with 200
    timeline: list[tuple[float, int | str]] = field(default_factory=list)  # (s from start, status)
    models: Counter = field(default_factory=Counter)  # answering model, with record_models
    codes: Counter = field(default_factory=Counter)  # (status, the error's "code") of non-200s

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float | None:
        if not self.latencies_ms:
            return None
        values = sorted(self.latencies_ms)
        return values[min(len(values) - 1, int(q / 100 * len(values)))]

    def summary(self) -> dict[str, Any]:
        return {
            **self._counts(),
            "rps": round(self.rps, 1),
            "p50_ms": _round(self.percentile(50)),
            "p99_ms": _round(self.percentile(99)),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items(), key=str)},
            "retry_after_on_503": self.retry_after,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _error_code(raw: bytes) -> str | None:
    """The ``code`` of an endpoint's JSON error (``overloaded``, ``not_ready``...)."""
    try:
        answer = json.loads(raw)
    except ValueError:
        return None
    return answer.get("code") if isinstance(answer, dict) else None


def run_load(
    url: str,
    texts: list[str],
    clients: int,
    duration_s: float,
    *,
    texts_per_request: int = 1,
    max_requests: int | None = None,
    timeout_s: float = 30.0,
    headers: dict[str, str] | None = None,
    record_models: bool = False,
) -> LoadResult:
    """POST ``{"texts": [...]}`` to ``url`` from ``clients`` concurrent connections."""
    return asyncio.run(
        _load(
            url,
            texts,
            clients,
            duration_s,
            texts_per_request,
            max_requests,
            timeout_s,
            headers,
            record_models,
        )
    )


async def _load(
    url, texts, clients, duration_s, per_request, max_requests, timeout_s, headers, models
):
    import aiohttp

    result = LoadResult(clients=clients, seconds=0.0)
    budget = [max_requests if max_requests is not None else float("inf")]
    start = time.perf_counter()
    deadline = start + duration_s

    async def client(index: int, session) -> None:
        i = index * 7919  # each client starts elsewhere in the texts
        while time.perf_counter() < deadline and budget[0] > 0:
            budget[0] -= 1
            batch = [texts[(i + k) % len(texts)] for k in range(per_request)]
            i += per_request
            sent = time.perf_counter()
            try:
                async with session.post(url, json={"texts": batch}, headers=headers) as resp:
                    raw = await resp.read()
                    status = resp.status
                    if models and status == 200:
                        result.models[json.loads(raw).get("model")] += 1
                    elif status != 200:
                        result.codes[status, _error_code(raw)] += 1
                    if status == 503 and "Retry-After" in resp.headers:
                        result.retry_after += 1
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                status = type(err).__name__
            result.statuses[status] += 1
            result.timeline.append((time.perf_counter() - start, status))
            if status == 200:
                result.latencies_ms.append((time.perf_counter() - sent) * 1000)
                result.texts += per_request
            elif isinstance(status, int) and status == 503:
                await asyncio.sleep(0.05)  # a shed client backs off a little, as told

    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(i, session) for i in range(clients)))
    result.seconds = time.perf_counter() - start
    return result


# ---------------------------------------------------------------------------- streamed answers
def _pick(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile of ``values`` (nearest rank, as ``LoadResult.percentile``)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


@dataclass
class StreamLoadResult(_Tally):
    """Streamed generation under load; a request is ok when its stream ended with ``[DONE]``
    after a usage chunk, with no error chunk (else its status says what went wrong)."""

    clients: int
    seconds: float
    statuses: Counter = field(default_factory=Counter)  # 200, HTTP status, or what failed
    ttft_ms: list[float] = field(default_factory=list)  # to the first content chunk
    itl_ms: list[float] = field(default_factory=list)  # gaps between content chunks
    total_ms: list[float] = field(default_factory=list)  # whole requests
    completion_tokens: int = 0  # summed from the usage chunks of the ok requests
    chunks: int = 0  # content chunks of the ok requests

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            **self._counts(),
            "errors": self.requests - self.ok,
            "rps": round(self.ok / self.seconds, 3) if self.seconds else 0.0,
            "tokens_per_s": round(self.tokens_per_s, 1),
            "completion_tokens": self.completion_tokens,
            "tokens_per_request": round(self.completion_tokens / self.ok, 1) if self.ok else None,
            "chunks_per_request": round(self.chunks / self.ok, 1) if self.ok else None,
            "ttft_p50_ms": _round(_pick(self.ttft_ms, 50)),
            "ttft_p99_ms": _round(_pick(self.ttft_ms, 99)),
            "itl_p50_ms": _round(_pick(self.itl_ms, 50)),
            "itl_p99_ms": _round(_pick(self.itl_ms, 99)),
            "total_p50_ms": _round(_pick(self.total_ms, 50)),
            "total_p99_ms": _round(_pick(self.total_ms, 99)),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items(), key=str)},
        }


def run_stream_load(
    url: str,
    bodies: list[dict[str, Any]],
    clients: int,
    duration_s: float,
    *,
    max_requests: int | None = None,
    timeout_s: float = 600.0,
    headers: dict[str, str] | None = None,
) -> StreamLoadResult:
    """POST ``bodies`` (OpenAI chat or completion requests, each sent with ``stream: true``
    and ``stream_options: {"include_usage": true}``) to ``url`` from ``clients`` concurrent
    connections, each reading its stream to ``data: [DONE]`` before it sends the next, for
    ``duration_s`` seconds or ``max_requests`` requests in all (a stream started in time is
    read to its end, and counted)."""
    return asyncio.run(
        _stream_load(url, bodies, clients, duration_s, max_requests, timeout_s, headers)
    )


async def _stream_load(url, bodies, clients, duration_s, max_requests, timeout_s, headers):
    import aiohttp

    result = StreamLoadResult(clients=clients, seconds=0.0)
    budget = [max_requests if max_requests is not None else float("inf")]
    start = time.perf_counter()
    deadline = start + duration_s
    extra = {"stream": True, "stream_options": {"include_usage": True}}

    async def one(session, body: dict) -> tuple[int | str, list[float], int | None]:
        """(status, times of the content chunks, completion tokens of the usage chunk)"""
        times: list[float] = []
        tokens = None
        async with session.post(url, json={**body, **extra}, headers=headers) as resp:
            if resp.status != 200:
                await resp.read()
                return resp.status, times, tokens
            async for raw in resp.content:  # aiohttp undoes the chunked transfer encoding
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue  # the blank line that ends an event, or an SSE comment
                data = line[5:].strip()
                if data == b"[DONE]":
                    return (200 if tokens is not None else "no usage chunk"), times, tokens
                try:
                    chunk = json.loads(data)
                except ValueError:
                    return "bad chunk", times, tokens
                if "error" in chunk:
                    return "error chunk", times, tokens
                if chunk.get("usage"):
                    tokens = int(chunk["usage"]["completion_tokens"])
                for choice in chunk.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content") or choice.get("text")
                    if text:
                        times.append(time.perf_counter())
                        break
        return "no [DONE]", times, tokens

    async def client(index: int, session) -> None:
        i = index * 7919  # each client starts elsewhere in the bodies
        while time.perf_counter() < deadline and budget[0] > 0:
            budget[0] -= 1
            body = bodies[i % len(bodies)]
            i += 1
            sent = time.perf_counter()
            try:
                status, times, tokens = await one(session, body)
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                status, times, tokens = type(err).__name__, [], None
            result.statuses[status] += 1
            if status != 200:
                await asyncio.sleep(0.05)  # a failed client backs off a little
                continue
            result.total_ms.append((time.perf_counter() - sent) * 1000)
            result.completion_tokens += tokens or 0
            result.chunks += len(times)
            if times:
                result.ttft_ms.append((times[0] - sent) * 1000)
                result.itl_ms.extend((b - a) * 1000 for a, b in zip(times, times[1:]))

    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(i, session) for i in range(clients)))
    result.seconds = time.perf_counter() - start
    return result


# ---------------------------------------------------------------------------- malformed input
def _bad_bodies(valid: str) -> list[tuple[str, bytes]]:
    big = "a " * 500_000  # 1 MB of text
    return [
        ("bad JSON", b'{"texts": ["unterminated'),
        ("bad JSON", b"texts=hello"),
        ("not an object", b'["a list", "of texts"]'),
        ("not an object", b'"just a string"'),
        ("wrong type", b'{"texts": "one string"}'),
        ("wrong type", b'{"texts": [1, 2, 3]}'),
        ("wrong type", b'{"texts": null}'),
        ("wrong type", b'{"texts": [["nested"]]}'),
        ("wrong type", b'{"texts": [{"text": "x"}]}'),
        ("empty texts", b'{"texts": []}'),
        ("empty texts", b'{"texts": [""]}'),
        ("empty texts", b'{"texts": ["   \\n\\t "]}'),
        ("1 MB text", json.dumps({"texts": [big]}).encode()),
        ("1 MB text", json.dumps({"texts": [valid, big]}).encode()),
        ("invalid UTF-8", b'{"texts": ["\xff\xfe bad bytes"]}'),
        ("invalid UTF-8", b'{"texts": ["caf\xc3"]}'),
        ("lone surrogate", b'{"texts": ["\\ud800"]}'),
        ("lone surrogate", b'{"texts": ["ok", "x\\udfff y"]}'),
        ("missing field", b"{}"),
        ("missing field", b'{"text": "singular"}'),
        ("extra field", json.dumps({"texts": [valid], "mode": "fast"}).encode()),
        ("huge list", json.dumps({"texts": [valid] * 10_000}).encode()),
        ("empty body", b""),
        ("deep nesting", b'{"texts": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    ]


def _bad_chat_bodies(valid: str) -> list[tuple[str, bytes]]:
    """Malformed bodies for ``/v1/chat/completions``: each must get a 4xx."""
    turn = {"role": "user", "content": valid}
    ok = {"messages": [turn], "max_tokens": 4}
    return [
        ("bad JSON", b'{"messages": [{"role": "user", "content": "unterminated'),
        ("not an object", b'[{"role": "user", "content": "hi"}]'),
        ("wrong type", json.dumps({"messages": valid}).encode()),
        ("wrong type", json.dumps({"messages": [valid]}).encode()),
        ("wrong type", json.dumps({**ok, "max_tokens": "4"}).encode()),
        ("wrong type", json.dumps({**ok, "temperature": "hot"}).encode()),
        ("wrong type", json.dumps({**ok, "stream": "yes"}).encode()),
        ("wrong type", json.dumps({**ok, "stop": [1, 2]}).encode()),
        ("out of range", json.dumps({**ok, "max_tokens": 0}).encode()),
        ("out of range", json.dumps({**ok, "max_tokens": 10**9}).encode()),
        ("out of range", json.dumps({**ok, "temperature": -1}).encode()),
        ("out of range", json.dumps({**ok, "top_p": 0}).encode()),
        ("out of range", json.dumps({**ok, "n": 3}).encode()),
        ("bad turns", json.dumps({"messages": []}).encode()),
        ("bad turns", json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode()),
        ("bad turns", json.dumps({"messages": [{"role": "user"}]}).encode()),
        ("bad turns", json.dumps({"messages": [{"role": "user", "content": " "}]}).encode()),
        ("bad turns", json.dumps({"messages": [{**turn, "role": "assistant"}]}).encode()),
        ("too long", json.dumps({"messages": [{**turn, "content": "word " * 20_000}]}).encode()),
        ("invalid UTF-8", b'{"messages": [{"role": "user", "content": "caf\xc3"}]}'),
        ("lone surrogate", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
        ("unknown model", json.dumps({**ok, "model": "no-such-model"}).encode()),
        ("missing field", b"{}"),
        ("empty body", b""),
        ("deep nesting", b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    ]


def malformed_requests(
    n: int, valid_texts: list[str], valid_every: int = 4, chat: bool = False
) -> Iterator[tuple]:
    """``n`` request bodies ``(kind, body, valid)``: every ``valid_every``-th is a valid one.
    ``chat``: bodies for ``/v1/chat/completions`` instead of ``/v1/predict``."""
    bad = 0
    for i in range(n):
        text = valid_texts[i % len(valid_texts)]
        if i % valid_every == 0:
            valid = {"messages": [{"role": "user", "content": text}], "max_tokens": 4}
            yield "valid", json.dumps(valid if chat else {"texts": [text]}).encode(), True
        else:
            bodies = (_bad_chat_bodies if chat else _bad_bodies)(text)
            kind, body = bodies[bad % len(bodies)]
            bad += 1
            yield kind, body, False


@dataclass
class MalformedResult:
    by_kind: dict[str, Counter] = field(default_factory=dict)
    valid_failed: int = 0
    server_errors: int = 0  # any 5xx
    not_json: int = 0  # error answers whose body was not {"error": ...}

    def summary(self) -> dict[str, Any]:
        return {
            "by_kind": {k: dict(v) for k, v in self.by_kind.items()},
            "valid_failed": self.valid_failed,
            "server_errors": self.server_errors,
            "errors_not_json": self.not_json,
        }


def send_malformed(
    url: str,
    valid_texts: list[str],
    n: int = 1000,
    concurrency: int = 16,
    headers: dict[str, str] | None = None,
    chat: bool = False,
) -> MalformedResult:
    """Send ``malformed_requests`` (``concurrency`` at a time) and tally the answers."""
    return asyncio.run(_malformed(url, valid_texts, n, concurrency, headers or {}, chat))


async def _malformed(url, valid_texts, n, concurrency, headers, chat):
    import aiohttp

    result = MalformedResult()
    queue = list(malformed_requests(n, valid_texts, chat=chat))
    sem = asyncio.Semaphore(concurrency)

    async def one(kind: str, body: bytes, valid: bool, session) -> None:
        async with sem:
            try:
                async with session.post(
                    url, data=body, headers={"Content-Type": "application/json", **headers}
                ) as resp:
                    raw = await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                status, raw = type(err).__name__, b""
        result.by_kind.setdefault(kind, Counter())[status] += 1
        if valid and status != 200:
            result.valid_failed += 1
        if isinstance(status, int) and status >= 500:
            result.server_errors += 1
        if status != 200:
            try:
                if "error" not in json.loads(raw):
                    result.not_json += 1
            except ValueError:
                result.not_json += 1

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(one(k, b, v, session) for k, b, v in queue))
    return result
