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
