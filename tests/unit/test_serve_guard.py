"""Pure pieces of the serving path: HAProxy's loopback rewrite, route labels, key digests."""

from lepton_ray.serve.guards import _route_label, key_digest
from lepton_ray.serve.haproxy_loopback import loopback_binds

RAY_TEMPLATE_BINDS = """\
frontend prometheus
    bind :9101
    mode http
frontend http_frontend
    bind 127.0.0.1:8000
frontend exposed
    bind 0.0.0.0:8001
listen stats
  bind *:8404
  stats enable
"""


def test_stats_and_metrics_binds_move_to_loopback_and_the_frontend_keeps_its_host():
    fixed = loopback_binds(RAY_TEMPLATE_BINDS)
    assert "    bind 127.0.0.1:9101\n" in fixed
    assert "  bind 127.0.0.1:8404\n" in fixed
    # Hosts given explicitly (the request frontend, serve.host) are left as they are.
    assert "bind 127.0.0.1:8000\n" in fixed and "bind 0.0.0.0:8001\n" in fixed
    assert ":9101" not in fixed.replace("127.0.0.1:9101", "")
    assert loopback_binds(fixed) == fixed  # idempotent: reloads rewrite the same file


def test_route_labels_strip_the_app_prefix_and_bound_cardinality():
    assert _route_label({"path": "/robust/v1/predict", "root_path": "/robust"}) == "/v1/predict"
    assert _route_label({"path": "/healthz/", "root_path": ""}) == "/healthz"
    assert _route_label({"path": "/v1/predict", "root_path": "/"}) == "/v1/predict"
    assert _route_label({"path": "/x/wp-admin.php", "root_path": "/x"}) == "other"


def test_the_replica_keeps_a_digest_not_the_key():
    digest = key_digest("s3cret")
    assert len(digest) == 64 and "s3cret" not in digest
    assert digest == key_digest("s3cret") != key_digest("s3cret ")


def _call(guard, scope, messages):
    """Run the middleware on one request; returns (status, headers, body)."""
    import asyncio

    sent = []

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)  # a client that never sends the rest

    async def send(message):
        sent.append(message)

    asyncio.run(guard(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body


def test_the_guard_refuses_with_json_and_counts_what_it_refused(monkeypatch):
    import json

    from lepton_ray.serve import app as module
    from lepton_ray.serve import guards

    reached = []

    async def inner(scope, receive, send):  # the routes: must not be reached
        reached.append(scope["path"])

    settings = module.ServeArgs(
        tracking_uri="sqlite:///x.db", api_key_sha256=key_digest("k"), body_timeout_s=0.2
    )
    metrics = guards._Metrics()
    monkeypatch.setattr(guards._replica, "settings", settings)
    monkeypatch.setattr(guards._replica, "metrics", metrics)
    guard = guards._Guard(inner)
    scope = {"type": "http", "method": "GET", "path": "/v1/model", "root_path": "", "headers": []}

    status, headers, body = _call(guard, scope, [])
    assert status == 401 and headers[b"www-authenticate"] == b"Bearer"
    assert headers[b"content-type"] == b"application/json"
    assert "API key" in json.loads(body)["error"]

    post = {
        **scope,
        "method": "POST",
        "path": "/v1/predict",
        "headers": [(b"authorization", b"Bearer k")],
    }
    partial = [{"type": "http.request", "body": b'{"texts": [', "more_body": True}]
    status, headers, body = _call(guard, post, partial)
    assert status == 408 and headers[b"connection"] == b"close"
    assert "did not arrive within 0.2 s" in json.loads(body)["error"]
    assert reached == []
    exposed = metrics.exposition().decode()
    assert 'lepton_serve_requests_total{route="/v1/model",status="401"} 1.0' in exposed
    assert 'lepton_serve_requests_total{route="/v1/predict",status="408"} 1.0' in exposed


def _ready(monkeypatch, **settings):
    """The middleware's replica state, as a ready replica sets it; returns its metrics."""
    from lepton_ray.serve import app as module
    from lepton_ray.serve import guards

    metrics = guards._Metrics()
    args = module.ServeArgs(tracking_uri="sqlite:///x.db", **settings)
    monkeypatch.setattr(guards._replica, "settings", args)
    monkeypatch.setattr(guards._replica, "metrics", metrics)
    monkeypatch.setattr(guards._replica, "body_bytes", 0)
    monkeypatch.setattr(guards._replica, "body_bytes_peak", 0)
    return metrics


def _inner(reached):
    async def inner(scope, receive, send):  # the routes: answer 200 after reading the body
        message = await receive()
        reached.append(len(message.get("body", b"")))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    return inner


def test_before_the_replica_is_ready_every_request_gets_503_and_no_route_is_reached(
    monkeypatch,
):
    import json

    from lepton_ray.serve import guards

    monkeypatch.setattr(guards._replica, "settings", None)
    monkeypatch.setattr(guards._replica, "metrics", None)
    reached = []
    guard = guards._Guard(_inner(reached))
    for path in ("/v1/predict", "/v1/model", "/healthz"):
        scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "headers": []}
        status, headers, body = _call(guard, scope, [])
        assert status == 503 and headers[b"retry-after"] == b"1", path
        assert json.loads(body) == {"error": "the replica is not ready yet", "code": "not_ready"}
    assert reached == []


def _post(length: int | None, key: bytes = b"Bearer k"):
    headers = [(b"authorization", key)]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    path = "/v1/predict"
    return {"type": "http", "method": "POST", "path": path, "root_path": "", "headers": headers}


def test_bodies_are_admitted_before_they_are_read_within_the_byte_cap(monkeypatch):
    import asyncio
    import json

    from lepton_ray.serve import guards

    cap = 100_000
    metrics = _ready(monkeypatch, api_key_sha256=key_digest("k"), max_body_bytes_in_flight=cap)
    reached = []
    guard = guards._Guard(_inner(reached))

    async def burst():
        """Two uploads of 60 kB that stall after their first chunk, then a third one."""
        stalled = asyncio.Event()
        messages = []

        async def stalling_receive():
            messages.append(1)
            if len(messages) == 1:
                return {"type": "http.request", "body": b"x" * 1000, "more_body": True}
            await stalled.wait()
            return {"type": "http.request", "body": b"y" * 59_000, "more_body": False}

        sent = []

        async def send(message):
            sent.append(message)

        first = asyncio.create_task(guard(_post(60_000), stalling_receive, send))
        await asyncio.sleep(0)  # the first holds its 60 kB from its Content-Length on
        assert guards._replica.body_bytes == 60_000
        third = []

        async def send_third(message):
            third.append(message)

        async def never():
            raise AssertionError("a refused body must not be read")

        await guard(_post(60_000), never, send_third)
        stalled.set()
        await first
        return sent, third

    sent, third = asyncio.run(burst())
    start = next(m for m in third if m["type"] == "http.response.start")
    assert start["status"] == 503 and dict(start["headers"])[b"retry-after"] == b"1"
    answer = json.loads(b"".join(m.get("body", b"") for m in third if "body" in m))
    assert answer["code"] == "overloaded_bytes", answer
    assert "max_body_bytes_in_flight 100000" in answer["error"]
    assert next(m for m in sent if m["type"] == "http.response.start")["status"] == 200
    assert reached == [60_000]
    # Released once answered; the peak never exceeded the cap.
    assert guards._replica.body_bytes == 0 and guards._replica.body_bytes_peak == 60_000
    exposed = metrics.exposition().decode()
    assert "lepton_serve_body_bytes_in_flight 0.0" in exposed
    assert "lepton_serve_body_bytes_in_flight_peak 60000.0" in exposed

    # A body that alone is over the cap can never fit: 413, before it is read.
    status, _, body = _call(guard, _post(cap + 1), [])
    assert status == 413 and f"over {cap} bytes" in json.loads(body)["error"]
    # Without Content-Length the bytes are counted as they arrive.
    chunks = [
        {"type": "http.request", "body": b"z" * 50_000, "more_body": True},
        {"type": "http.request", "body": b"z" * 50_001, "more_body": False},
    ]
    status, _, body = _call(guard, _post(None), chunks)
    assert status == 413 and guards._replica.body_bytes == 0
    assert reached == [60_000]


def test_a_key_check_comes_before_the_body_is_admitted(monkeypatch):
    from lepton_ray.serve import guards

    _ready(monkeypatch, api_key_sha256=key_digest("k"), max_body_bytes_in_flight=70_000)
    guard = guards._Guard(_inner([]))
    status, _, _ = _call(guard, _post(60_000, key=b"Bearer wrong"), [])
    assert status == 401 and guards._replica.body_bytes_peak == 0
