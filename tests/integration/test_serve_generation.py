"""The OpenAI-compatible generation API on a real Ray Serve endpoint, with real clients: a
tiny Llama trained and registered by `lepton-ray run` (task causal_lm), deployed by the same
command behind an API key, then queried by the official `openai` package, `curl -N` and raw
HTTP: chat and text completions with and without streaming (the same text at temperature
0), tokens sent as they are generated, requests that arrive together share the batch,
every limit is a 400 in OpenAI's error shape.

The model is trained one step at a tiny learning rate, so it stays close to its random
start and rarely stops on its own: each request generates the tokens it asks for."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time

import pytest
import requests
from typer.testing import CliRunner

from lepton_ray.cli import app
from lepton_ray.data.sample import write_chats_jsonl
from tests.conftest import TINY_LLAMA, smoke_config, write_yaml

pytestmark = pytest.mark.slow
runner = CliRunner()
KEY_ENV = "LRT_GEN_KEY"
KEY = "gen-s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = [
    {"role": "system", "content": "Answer in upper case."},
    {"role": "user", "content": "Say lamp."},
]


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory, ray_session, serve_port, smollm2_path):
    tmp = tmp_path_factory.mktemp("generate")
    data = write_chats_jsonl(tmp / "chats.jsonl", n=120, seed=2)
    raw = smoke_config(tmp, data, name="genlm")
    raw["task"] = "causal_lm"
    raw["data"] = {
        "path": str(data),
        "max_length": 64,
        "split": {"validation": 0.15, "test": 0.1},
        "chat": {"format": "messages"},
    }
    raw["model"] = {"name": "smollm2", "random_init": True, "config_overrides": TINY_LLAMA}
    raw["peft"] = {"method": "none"}
    raw["train"] = {
        "epochs": 1,
        "batch_size": 8,
        "lr": 1e-7,
        "max_steps_per_epoch": 1,
        "generation": {"samples": 2, "max_new_tokens": 4},
    }
    raw["scaling"] = {"num_workers": 1}
    raw["tune"] = {"enabled": False, "metric": "val_perplexity"}
    raw["compress"] = {"enabled": False}
    raw["serve"] = {
        "enabled": True,
        "port": serve_port,
        "app_name": "gen",
        "route_prefix": "/gen",
        "num_cpus": 0.5,
        "api_key_env": KEY_ENV,
        "max_tokens_limit": 400,
        "default_max_tokens": 16,
        "generation_batch_size": 4,
        "max_queued_texts": 16,
        "example_texts": ["What is 2 plus 3?"],
    }
    path = write_yaml(tmp / "genlm.yaml", raw)
    mp = pytest.MonkeyPatch()
    mp.setenv(KEY_ENV, KEY)
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    assert "/v1/chat/completions" in result.output and "curl -N" in result.output
    yield {"url": f"http://127.0.0.1:{serve_port}/gen", "config": path}
    runner.invoke(app, ["serve", str(path), "--stop"])
    mp.undo()


@pytest.fixture(scope="module")
def client(endpoint):
    import openai

    return openai.OpenAI(base_url=f"{endpoint['url']}/v1", api_key=KEY, max_retries=0)


def test_the_openai_client_chats_with_and_without_streaming_alike(client):
    kwargs = {"model": "genlm", "messages": CHAT, "max_tokens": 12, "temperature": 0, "seed": 3}
    whole = client.chat.completions.create(**kwargs)
    text = whole.choices[0].message.content
    assert whole.object == "chat.completion" and whole.model == "genlm"
    assert whole.choices[0].message.role == "assistant" and text
    assert whole.choices[0].finish_reason in ("stop", "length")
    usage = whole.usage
    assert usage.prompt_tokens > 5 and 1 <= usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].usage.completion_tokens == usage.completion_tokens


def test_the_openai_client_completes_a_prompt(client):
    kwargs = {"model": "genlm", "prompt": "What is 2 plus 3?", "max_tokens": 8, "temperature": 0}
    whole = client.completions.create(**kwargs)
    assert whole.object == "text_completion" and whole.choices[0].text
    assert whole.usage.completion_tokens <= 8
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True))
    assert streamed == whole.choices[0].text


def test_models_lists_the_registered_version(client, endpoint):
    [card] = client.models.list().data
    assert card.id == "genlm" and card.owned_by == "lepton-ray"
    extra = card.model_extra
    assert extra["version"] == "1" and extra["uri"] == "models:/genlm/1"
    # The version's own names are accepted as `model`; anything else is a 404.
    for name in ("genlm/1", "models:/genlm/1"):
        reply = client.chat.completions.create(model=name, messages=CHAT, max_tokens=2)
        assert reply.choices[0].message.content is not None
    import openai

    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=2)
    assert err.value.body["code"] == "model_not_found"


def test_the_api_key_is_a_bearer_token(endpoint):
    import openai

    url = endpoint["url"]
    assert requests.get(f"{url}/healthz", timeout=5).status_code == 200
    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.chat.completions.create(model="genlm", messages=CHAT, max_tokens=2)
    assert err.value.body["type"] == "authentication_error"
    resp = requests.get(f"{url}/v1/models", timeout=5)
    assert resp.status_code == 401 and set(resp.json()["error"]) == {
        "message",
        "type",
        "param",
        "code",
    }


def test_tokens_stream_as_they_are_generated_and_curl_sees_them(endpoint):
    body = {"messages": CHAT, "max_tokens": 200, "temperature": 0, "stream": True}
    started = time.perf_counter()
    arrivals = []
    with requests.post(
        f"{endpoint['url']}/v1/chat/completions", json=body, headers=AUTH, stream=True, timeout=60
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line:
                arrivals.append((time.perf_counter() - started, line.decode()))
    assert arrivals[-1][1] == "data: [DONE]"
    content = [t for t, line in arrivals if '"content":"' in line and '"content":""' not in line]
    first, last = content[0], content[-1]
    # 200 tokens take a while; the first ones arrived long before the last.
    assert len(content) > 20 and first < 0.5 * last, (first, last, len(content))

    out = subprocess.run(
        [
            "curl",
            "-sN",
            "-X",
            "POST",
            f"{endpoint['url']}/v1/chat/completions",
            "-H",
            "Content-Type: application/json",
            "-H",
            f"Authorization: Bearer {KEY}",
            "-d",
            json.dumps({**body, "max_tokens": 10}),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    events = [line for line in out.splitlines() if line]
    assert events[-1] == "data: [DONE]" and len(events) > 3
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_requests_that_arrive_together_share_the_batch_and_each_gets_its_own_answer(endpoint):
    url = f"{endpoint['url']}/v1/chat/completions"
    prompts = [f"Say word {i}." for i in range(6)]

    def ask(prompt):
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 10}
        resp = requests.post(url, json={**body, "temperature": 0}, headers=AUTH, timeout=60)
        assert resp.status_code == 200, resp.text
        return resp.json()["choices"][0]["message"]["content"]

    alone = [ask(p) for p in prompts]
    together: list[str | None] = [None] * len(prompts)

    def worker(i):
        together[i] = ask(prompts[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        ({"messages": CHAT, "max_tokens": 401}, "max_tokens", "serve.max_tokens_limit"),
        ({"messages": []}, "messages", "at least one message"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages", "role"),
        ({"messages": [{"role": "user", "content": "  "}]}, "messages", "empty"),
        ({"messages": CHAT, "n": 2}, "n", "n=1"),
        ({"messages": CHAT, "max_tokens": "ten"}, "max_tokens", "integer"),
        ({"messages": CHAT, "temperature": 3}, "temperature", "2"),
        ({"messages": "hello"}, "messages", "list"),
        ({"prompt": ["a", "b"]}, "prompt", "one prompt"),
        (
            {"messages": [{"role": "user", "content": "word " * 9000}], "max_tokens": 8},
            "messages",
            "context",
        ),
    ],
)
def test_bad_requests_are_400_in_openai_shape(endpoint, body, param, needle):
    route = "completions" if "prompt" in body else "chat/completions"
    resp = requests.post(f"{endpoint['url']}/v1/{route}", json=body, headers=AUTH, timeout=30)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert needle in error["message"], error


def test_malformed_json_is_a_400_and_health_stays_up(endpoint):
    url = f"{endpoint['url']}/v1/chat/completions"
    for raw in (b"{", b"[1, 2]", b"\xff\xfe", b'{"messages": [{"role": "user"}]}', b"null"):
        resp = requests.post(
            url, data=raw, headers={**AUTH, "Content-Type": "application/json"}, timeout=10
        )
        assert 400 <= resp.status_code < 500, (raw, resp.status_code, resp.text)
        assert "message" in resp.json()["error"]
    assert requests.get(f"{endpoint['url']}/healthz", timeout=5).status_code == 200


def test_metrics_report_tokens_first_token_time_and_queues(endpoint):
    text = requests.get(f"{endpoint['url']}/metrics", headers=AUTH, timeout=5).text
    generated = re.search(r"^lepton_serve_generated_tokens_total ([0-9.e+]+)$", text, re.M)
    assert generated and float(generated.group(1)) > 0
    assert re.search(r"^lepton_serve_time_to_first_token_seconds_count [1-9]", text, re.M)
    for series in ("generated_tokens_per_second", "waiting_sequences", "running_sequences"):
        assert f"lepton_serve_{series} " in text


def _cancelled(endpoint) -> float:
    text = requests.get(f"{endpoint['url']}/metrics", headers=AUTH, timeout=5).text
    found = re.search(r"^lepton_serve_cancelled_generations_total ([0-9.e+]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_client_that_disconnects_mid_stream_stops_its_generation(endpoint):
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(endpoint["url"])
    before = _cancelled(endpoint)
    body = json.dumps({"messages": CHAT, "max_tokens": 400, "temperature": 0, "stream": True})
    request = (
        f"POST {url.path}/v1/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()
    sock = socket.create_connection((url.hostname, url.port), timeout=30)
    sock.sendall(request)
    received = b""
    while received.count(b'"content":"') < 3:  # a few tokens in: the generation runs
        received += sock.recv(4096)
    sock.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _cancelled(endpoint) == before:
        time.sleep(0.2)
    assert _cancelled(endpoint) == before + 1
    health = requests.get(f"{endpoint['url']}/healthz", timeout=5).json()
    assert health["running"] == 0 and health["waiting"] == 0


def test_offline_predict_generates_through_ray_data_as_the_endpoint_does(endpoint, tmp_path):
    prompts = [
        CHAT,
        [{"role": "user", "content": "Say word 4."}],
        [*CHAT, {"role": "assistant", "content": "LAMP"}],
    ]
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"messages": m}) + "\n" for m in prompts))
    out = tmp_path / "out.jsonl"
    result = runner.invoke(
        app,
        [
            "predict",
            str(endpoint["config"]),
            "--input",
            str(src),
            "--output",
            str(out),
            "--max-tokens",
            "10",
            "--temperature",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"prompts.jsonl:{i}" for i in range(3)]
    for row, messages in zip(rows, prompts, strict=True):
        asked = [m for m in messages if m["role"] != "assistant"]  # a trailing answer is dropped
        body = {"messages": asked, "max_tokens": 10, "temperature": 0}
        resp = requests.post(
            f"{endpoint['url']}/v1/chat/completions", json=body, headers=AUTH, timeout=60
        )
        answer = resp.json()
        assert row["generated"] == answer["choices"][0]["message"]["content"]
        assert row["finish_reason"] == answer["choices"][0]["finish_reason"]
        assert row["prompt_tokens"] == answer["usage"]["prompt_tokens"]
        assert row["completion_tokens"] == answer["usage"]["completion_tokens"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}) + "\n")
    result = runner.invoke(
        app,
        [
            "predict",
            str(endpoint["config"]),
            "--input",
            str(bad),
            "--output",
            str(tmp_path / "x.jsonl"),
        ],
    )
    assert result.exit_code != 0 and "unknown role 'wizard'" in result.output, result.output
    assert not (tmp_path / "x.jsonl").exists()


def test_the_vllm_engine_is_refused_here_in_one_line_and_the_endpoint_stays(endpoint):
    result = runner.invoke(app, ["serve", str(endpoint["config"]), "--set", "serve.engine=vllm"])
    assert result.exit_code != 0 and "vLLM is not installed" in result.output, result.output
    health = requests.get(f"{endpoint['url']}/healthz", timeout=5)
    assert health.status_code == 200 and health.json()["model_version"] == "1"


def test_a_bounded_fuzz_of_malformed_bodies_gets_only_4xx_and_health_stays_up(endpoint):
    from lepton_ray.serve.load import send_malformed

    url = f"{endpoint['url']}/v1/chat/completions"
    texts = ["Say lamp.", "What is 2 plus 3?", "Name a colour."]
    result = send_malformed(url, texts, n=150, concurrency=8, headers=AUTH, chat=True)
    summary = result.summary()
    assert result.server_errors == 0 and result.not_json == 0, summary
    assert result.valid_failed == 0, summary
    assert all(
        isinstance(status, int) and 400 <= status < 500
        for kind, statuses in result.by_kind.items()
        if kind != "valid"
        for status in statuses
    ), summary
    assert requests.get(f"{endpoint['url']}/healthz", timeout=5).status_code == 200


def test_a_new_version_swaps_in_with_no_failed_or_cut_stream(endpoint, ray_session):
    """Streams running when version 2 is deployed finish whole (on version 1's engine); the
    next requests get version 2. Version 2 is the same weights registered again: the swap,
    not the training, is under test."""
    import mlflow
    import yaml

    cfg = yaml.safe_load(endpoint["config"].read_text())
    client = mlflow.MlflowClient(cfg["tracking"]["tracking_uri"])
    first = client.get_model_version("genlm", "1")
    second = client.create_model_version("genlm", first.source, first.run_id)
    body = {"messages": CHAT, "max_tokens": 60, "temperature": 0, "stream": True}
    outcomes: list[tuple[int, str]] = []
    stop = threading.Event()

    def traffic():
        while not stop.is_set():
            with requests.post(
                f"{endpoint['url']}/v1/chat/completions",
                json=body,
                headers=AUTH,
                stream=True,
                timeout=60,
            ) as resp:
                lines = [line.decode() for line in resp.iter_lines() if line]
            outcomes.append((resp.status_code, lines[-1] if lines else ""))

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        result = runner.invoke(
            app,
            ["serve", str(endpoint["config"]), "--model-uri", f"models:/genlm/{second.version}"],
        )
        assert result.exit_code == 0, result.output
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert len(outcomes) >= 6 and set(outcomes) == {(200, "data: [DONE]")}, outcomes
    models = requests.get(f"{endpoint['url']}/v1/models", headers=AUTH, timeout=5).json()
    assert models["data"][0]["version"] == str(second.version)
