"""Fail closed: a registry that cannot answer mid-gate stops the promotion with an error that
names it; its silence is never read as "no champion yet", under any promotion policy.

A real ``mlflow server`` on 127.0.0.1 holds the registry. The gate reaches it through a
small HTTP relay that forwards every request until the challenger's version has been read,
then fails: once (a blip, after which the server answers again, writes included), or for
good (the server is gone). MLflow's client is told not to retry, so that the failure is
what the gate sees.
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
from mlflow.tracking import MlflowClient

from lepton_ray.config import validate_experiment
from lepton_ray.errors import StageError
from lepton_ray.registry import gate, versions
from tests.conftest import register_tiny, smoke_config
from tests.integration.two_nodes import MlflowServer

CANDIDATE_READ = "/api/2.0/mlflow/model-versions/get"
quiet = lambda _: None  # noqa: E731


class FailingRelay:
    """Forwards HTTP to ``upstream`` until a request to ``after`` has been answered (None:
    from the start); then answers the next ``failures`` requests (None: all of them) 503, as
    a failing server does."""

    def __init__(self, upstream: str, after: str | None, failures: int | None):
        self.upstream = urlsplit(upstream)
        self.after, self.failures = after, failures
        self.tripped, self.failed = after is None, 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _fails_now(self) -> bool:
        with self.lock:
            if self.tripped and (self.failures is None or self.failed < self.failures):
                self.failed += 1
                return True
            return False

    def _handler(relay):  # noqa: N805 - the handler class closes over the relay
        class Handler(BaseHTTPRequestHandler):
            def _relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if relay._fails_now():
                    self._answer(503, [], b'{"error_code": "TEMPORARILY_UNAVAILABLE"}')
                    return
                conn = http.client.HTTPConnection(
                    relay.upstream.hostname, relay.upstream.port, timeout=120
                )
                skip = {"host", "connection", "content-length"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if relay.after and self.path.startswith(relay.after):
                    with relay.lock:
                        relay.tripped = True
                self._answer(resp.status, resp.getheaders(), data)

            def _answer(self, status: int, headers, data: bytes) -> None:
                self.send_response(status)
                skip = {"transfer-encoding", "connection", "content-length"}
                for key, value in headers:
                    if key.lower() not in skip:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = _relay

            def log_message(self, *args) -> None:
                pass

        return Handler

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    started = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield started.start()
    finally:
        started.stop()


@pytest.fixture
def store(server, tiny_artifact, monkeypatch):
    """'reg' on the server: v1 @champion (val_accuracy 0.80), v2 @challenger claiming 0.99 on
    the same split (a gate that reads no champion, or skips the gate, promotes it)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    c = MlflowClient(server.uri, registry_uri=server.uri)
    if c.get_experiment_by_name("reg") is None:
        c.create_experiment("reg")
    for model in c.search_registered_models():
        c.delete_registered_model(model.name)
    experiment = c.get_experiment_by_name("reg").experiment_id
    store = {"uri": server.uri, "client": c, "experiment": experiment}
    v1 = register_tiny(store, tiny_artifact, 0.80)
    versions.promote(server.uri, "reg", v1, log=quiet)
    v2 = register_tiny(store, tiny_artifact, 0.99)
    return store | {"v1": v1, "v2": v2}


def _champion(store) -> str:
    return str(store["client"].get_model_version_by_alias("reg", "champion").version)


@pytest.mark.parametrize("failures", [1, None], ids=["a-blip", "gone"])
def test_a_registry_failing_mid_gate_stops_the_promotion(store, failures):
    relay = FailingRelay(store["uri"], CANDIDATE_READ, failures)
    try:
        with pytest.raises(StageError) as refused:
            versions.promote(relay.uri, "reg", store["v2"], log=quiet)
    finally:
        relay.close()
    message = str(refused.value)
    assert relay.failed >= 1, "the relay never failed: the test did not test the gate"
    assert f"reg v{store['v2']} not promoted" in message, message
    assert "could not read" in message and relay.uri in message, message
    assert _champion(store) == store["v1"]


def test_the_manual_policy_is_not_bypassed_by_a_failing_registry(store, tmp_path):
    data = tmp_path / "reviews.csv"
    data.write_text("review,sentiment\nfine,positive\n")
    raw = smoke_config(tmp_path, data, registry={"promotion": "manual"})
    relay = FailingRelay(store["uri"], None, failures=1)  # the very first read fails
    raw["tracking"] |= {"tracking_uri": relay.uri, "registered_model_name": "reg"}
    cfg = validate_experiment(raw)
    try:
        with pytest.raises(StageError, match="could not read"):
            gate.settle(cfg, store["v2"], log=quiet)
    finally:
        relay.close()
    assert relay.failed == 1
    assert _champion(store) == store["v1"]
