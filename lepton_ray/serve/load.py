"""Drive an endpoint: concurrent load and malformed requests (benchmarks and tests).

``run_load`` is a closed-loop load generator: ``clients`` concurrent connections, each sending
one request, waiting for its answer, then sending the next, for ``duration_s`` seconds or
``max_requests`` requests in all. ``malformed_requests`` yields request bodies that an
endpoint must refuse with a 4xx (and never a 500), mixed with valid ones that it must answer.
Both use only loopback addresses the caller gives them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LoadResult:
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
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

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
            "clients": self.clients,
            "seconds": round(self.seconds, 2),
            "requests": self.requests,
            "ok": self.ok,
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


def malformed_requests(n: int, valid_texts: list[str], valid_every: int = 4) -> Iterator[tuple]:
    """``n`` request bodies ``(kind, body, valid)``: every ``valid_every``-th is a valid one."""
    bad = 0
    for i in range(n):
        text = valid_texts[i % len(valid_texts)]
        if i % valid_every == 0:
            yield "valid", json.dumps({"texts": [text]}).encode(), True
        else:
            bodies = _bad_bodies(text)
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
) -> MalformedResult:
    """Send ``malformed_requests`` (``concurrency`` at a time) and tally the answers."""
    return asyncio.run(_malformed(url, valid_texts, n, concurrency, headers or {}))


async def _malformed(url, valid_texts, n, concurrency, headers):
    import aiohttp

    result = MalformedResult()
    queue = list(malformed_requests(n, valid_texts))
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
