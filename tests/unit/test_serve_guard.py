"""Pure pieces of the serving path: HAProxy's loopback rewrite, route labels, key digests."""

from lepton_ray.serve.app import _route_label, key_digest
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

    reached = []

    async def inner(scope, receive, send):  # the routes: must not be reached
        reached.append(scope["path"])

    settings = module.ServeArgs(
        tracking_uri="sqlite:///x.db", api_key_sha256=key_digest("k"), body_timeout_s=0.2
    )
    metrics = module._Metrics()
    monkeypatch.setattr(module._replica, "settings", settings)
    monkeypatch.setattr(module._replica, "metrics", metrics)
    guard = module._Guard(inner)
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
