"""lepton-ray's generation endpoint under streamed load, beside a bare server and offline batches.

    python benchmarks/generate_load.py --tracking-uri sqlite:////tmp/bench-chat/mlflow.db \
        --model-uri models:/chat-lora/1

32 short instruction prompts built in (one user message each, greedy: ``temperature: 0``,
``max_tokens`` from ``--max-tokens``), streamed (``stream: true`` with the usage chunk) by a
closed-loop asyncio client (``lepton_ray.serve.load.run_stream_load``) on loopback. For each
load level (1, 4, 16 clients) the endpoint and the bare server are measured in turn, each
after a warm-up round (one request per client), for ``--duration-s`` seconds or
``--requests`` requests; a stream started in time is read to its end and counted, so the wall
time of a level includes that tail. Per level: completion tokens/s (usage chunks' tokens over
wall seconds), requests/s, time to the first content chunk (TTFT) and the gaps between
consecutive content chunks (inter-token latency), p50/p99, and errors; for the endpoint also
how many sequences its engine was running (``/healthz``, sampled every 0.25 s).

The endpoint is the registered version deployed with lepton-ray's code
(``build_generation_app`` and ``ServeArgs``, ``generation_batch_size`` 16, so 16 clients can
share one batch) as its own Serve application on a free port of 127.0.0.1: on a private
in-process Ray instance (``--ray-address`` unset) or on the cluster given, where only this
application is removed at the end. The bare server is FastAPI + uvicorn in its own process,
loading the same artifact and rendering prompts through the same task ``prompt_ids``, that
answers the same streamed chat API one request at a time (a lock around a greedy loop with a
KV cache, no batching across requests). The offline figure is ``model.generate`` over the same
prompts in this process, in left-padded batches of 16, greedy, ``max_new_tokens`` =
``--max-tokens``, after a warm-up; its tokens are counted up to and including the stop token
of each row (as the endpoint's usage does), never the padding.

Torch threads: the replica, the bare server and the offline run all get
``torch.set_num_threads(--threads)`` (default: every core, the replica's own default;
``ServeArgs.torch_threads`` carries it). The replica reserves ``--replica-cpus`` (default 0,
as in ``serve_load.py``) of Ray's CPUs: its threads, not Ray's accounting, decide its cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext, suppress
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, median, start_bare, write  # noqa: E402
from pydantic import BaseModel, ConfigDict  # noqa: E402

from lepton_ray.runtime.cluster import bind_to_loopback, free_port  # noqa: E402

PROMPTS = [
    "What is the capital of Australia?",
    "Explain photosynthesis in one sentence.",
    "Give me three tips for better sleep.",
    "Translate 'good morning' into French.",
    "What is 17 times 23?",
    "Write a haiku about autumn leaves.",
    "Why is the sky blue?",
    "Name a famous painting by Vincent van Gogh.",
    "How do I boil an egg?",
    "What does a CPU do?",
    "Summarize the plot of Romeo and Juliet briefly.",
    "What is the boiling point of water in Fahrenheit?",
    "Suggest a name for a pet goldfish.",
    "What is the difference between weather and climate?",
    "List three primary colors.",
    "How many continents are there?",
    "Write a short thank-you note to a teacher.",
    "What is a prime number?",
    "Describe the taste of a lemon.",
    "Who wrote 'Pride and Prejudice'?",
    "What is the largest planet in our solar system?",
    "Give one reason to learn a second language.",
    "How does a rainbow form?",
    "Convert 5 kilometers to miles.",
    "What is the opposite of 'generous'?",
    "Recommend a healthy breakfast.",
    "What is gravity?",
    "Write one sentence about the ocean.",
    "Why do cats purr?",
    "What is the square root of 144?",
    "Name two renewable sources of energy.",
    "How do vaccines work, in simple terms?",
]
BATCH = 16  # the engine's batch (generation_batch_size) and the offline batches


def chat_bodies(max_tokens: int) -> list[dict[str, Any]]:
    return [
        {"messages": [{"role": "user", "content": p}], "max_tokens": max_tokens, "temperature": 0.0}
        for p in PROMPTS
    ]


# ------------------------------------------------------------------------------- bare server
class ChatBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    messages: list[dict[str, str]]
    max_tokens: int = 16
    temperature: float = 0.0
    stream: bool = False
    stream_options: dict[str, Any] | None = None


def bare_server(folder: str, port: int, threads: int) -> None:
    """FastAPI + uvicorn, the same model and template, one request at a time: the baseline.

    Greedy only; answers ``POST /v1/chat/completions`` with ``stream: true`` in OpenAI's
    chunk format (role chunk, content chunks, finish chunk, usage chunk, ``[DONE]``)."""
    import asyncio
    import inspect
    import json
    import uuid

    import torch
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    from lepton_ray.compress.formats import load_model_artifact
    from lepton_ray.serve.engine import context_limit
    from lepton_ray.tasks import get_task

    torch.set_num_threads(threads)
    model, tokenizer, meta = load_model_artifact(Path(folder))
    model.eval()
    task = get_task(meta.task)
    task.check_tokenizer(tokenizer, meta)
    stops = frozenset(int(t) for t in meta.extra["chat"]["stop_token_ids"])
    limit = context_limit(model, meta)
    # transformers 5.25 renamed past_key_values to cache (as the engine does).
    cache_arg = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    )
    lock = asyncio.Lock()
    app = FastAPI()

    def sse(head: dict, choices: list, **extra) -> str:
        return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

    async def stream(ids: list[int], max_tokens: int, usage: bool):
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": "bare",
        }

        def content(text: str) -> str:
            return sse(head, [{"index": 0, "delta": {"content": text}, "finish_reason": None}])

        async with lock:
            yield sse(
                head,
                [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "finish_reason": None,
                    }
                ],
            )
            tokens: list[int] = []
            generated, sent, cache, finish = 0, 0, None, "length"
            step = torch.tensor([ids], dtype=torch.long)
            while True:
                with torch.inference_mode():
                    out = model(input_ids=step, use_cache=True, **{cache_arg: cache})
                cache = getattr(out, cache_arg)
                token = int(out.logits[0, -1].argmax())
                generated += 1
                if token in stops:
                    finish = "stop"
                    break
                tokens.append(token)
                if len(tokens) >= min(max_tokens, limit - len(ids)):
                    break
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                if len(text) > sent and not text.endswith("\ufffd"):  # never half a character
                    yield content(text[sent:])
                    sent = len(text)
                step = torch.tensor([[token]], dtype=torch.long)
                await asyncio.sleep(0)  # let the server send the chunk
            rest = tokenizer.decode(tokens, skip_special_tokens=True)[sent:]
            if rest:
                yield content(rest)
            yield sse(head, [{"index": 0, "delta": {}, "finish_reason": finish}])
            if usage:
                counts = {
                    "prompt_tokens": len(ids),
                    "completion_tokens": generated,
                    "total_tokens": len(ids) + generated,
                }
                yield sse(head, [], usage=counts)
            yield "data: [DONE]\n\n"

    @app.get("/healthz")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        ids = task.prompt_ids(tokenizer, meta, body.messages)
        usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(
            stream(ids, body.max_tokens, usage), media_type="text/event-stream"
        )

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ----------------------------------------------------------------------------------- offline
def offline(folder: Path, max_tokens: int, threads: int, repeats: int) -> dict:
    """Completion tokens/s of ``model.generate`` over the prompts in batches of 16 (greedy)."""
    import torch

    from lepton_ray.compress.formats import load_model_artifact
    from lepton_ray.tasks import get_task
    from lepton_ray.tasks.causal_lm_eval import generate

    torch.set_num_threads(threads)
    model, tokenizer, meta = load_model_artifact(folder)
    model.eval()
    task = get_task(meta.task)
    task.check_tokenizer(tokenizer, meta)
    stops = meta.extra["chat"]["stop_token_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    prompts = [task.prompt_ids(tokenizer, meta, [{"role": "user", "content": p}]) for p in PROMPTS]

    def run(rows: list[list[int]], new_tokens: int) -> int:
        tokens = 0
        with torch.inference_mode():
            for i in range(0, len(rows), BATCH):
                answers = generate(model, rows[i : i + BATCH], stops, pad, new_tokens, device)
                tokens += sum(len(ids) + (why == "stop") for ids, why in answers)
        return tokens

    run(prompts[:BATCH], min(8, max_tokens))  # warm-up
    rates, counts = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        counts.append(run(prompts, max_tokens))
        rates.append(counts[-1] / (time.perf_counter() - start))
    return {
        "batch_size": BATCH,
        "max_new_tokens": max_tokens,
        "tokens_per_s": round(median(rates), 1),
        "rates": [round(r, 1) for r in rates],
        "completion_tokens_per_pass": counts[0],
        "prompts": len(prompts),
    }


# ----------------------------------------------------------------------------------- lepton
def start_endpoint(args, threads: int, app_name: str) -> tuple[str, bool]:
    """Ray (private unless ``--ray-address``), Serve on 127.0.0.1, and the application.
    Returns the application's URL and whether the Ray instance is this process's own."""
    import ray
    from ray import serve

    from lepton_ray.config import ClusterSection
    from lepton_ray.serve.app import ServeArgs
    from lepton_ray.serve.client import wait_healthy
    from lepton_ray.serve.generation_app import build_generation_app
    from lepton_ray.tracking.mlflow import get_model_version

    private = not args.ray_address
    if private:
        for key in [k for k in os.environ if k.startswith("RAY_SERVE_") and "HAPROXY" in k]:
            del os.environ[key]
        os.environ.pop("RAY_SERVE_ENABLE_HA_PROXY", None)
    from lepton_ray.runtime.cluster import init_ray

    cluster = ClusterSection(
        address=args.ray_address or "local", num_cpus=os.cpu_count(), serve_ingress="proxy"
    )
    init_ray(cluster, log=print)
    from ray.serve.context import _get_global_client

    running = None if private else _get_global_client(raise_if_no_controller_running=False)
    if running is not None:  # a shared cluster's Serve keeps its one HTTP address
        host, port = running.http_config.host, running.http_config.port
    else:
        host, port = "127.0.0.1", free_port()
        serve.start(http_options={"host": host, "port": port})
    version = get_model_version(args.tracking_uri, args.model_uri)
    serve_args = ServeArgs(
        tracking_uri=args.tracking_uri,
        model_uri=f"models:/{version.name}/{version.version}",
        model_name=version.name,
        model_version=str(version.version),
        torch_threads=threads,
        generation_batch_size=BATCH,
        max_tokens_limit=max(512, args.max_tokens),
        default_max_tokens=args.max_tokens,
    )
    app = build_generation_app(serve_args, host, num_cpus=args.replica_cpus)
    prefix = f"/{app_name}"
    serve.run(app, name=app_name, route_prefix=prefix, blocking=False)
    url = f"http://{host}:{port}{prefix}"
    wait_healthy(url, timeout_s=600, version=str(version.version))
    print(f"[bench] endpoint {args.model_uri} ready at {url} (Ray {ray.__version__})", flush=True)
    return url, private


def stop_endpoint(app_name: str, private: bool) -> None:
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    if private:
        serve.shutdown()
    else:
        from lepton_ray.runtime.cluster import serve_applications

        if app_name in serve_applications():
            serve.delete(app_name)  # only this application: the cluster is shared
    ray.shutdown()


class RunningSampler:
    """``/healthz``'s ``running`` (sequences in the engine's batch), every ``every_s``."""

    def __init__(self, url: str, every_s: float = 0.25):
        self.url, self.every_s = url, every_s
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        import requests

        with requests.Session() as session:
            while not self._stop.wait(self.every_s):
                with suppress(requests.RequestException, ValueError, KeyError):
                    self.samples.append(int(session.get(self.url, timeout=5).json()["running"]))

    def __enter__(self) -> RunningSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        busy = [s for s in self.samples if s > 0]
        return {
            "running_max": max(self.samples, default=0),
            "running_mean_busy": round(sum(busy) / len(busy), 2) if busy else 0.0,
            "running_samples": len(self.samples),
        }


# ------------------------------------------------------------------------------------ report
def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def table(levels: list[dict], offline_rate: float) -> str:
    lines = [
        f"{'server':12s} {'clients':>7s} {'req/s':>7s} {'tok/s':>8s} {'TTFT p50/p99 ms':>16s} "
        f"{'ITL p50/p99 ms':>15s} {'tok/req':>7s} {'batch':>5s} {'errors':>6s}",
    ]
    for r in levels:
        batch = str(r.get("running_max", "-"))
        lines.append(
            f"{r['server']:12s} {r['clients']:7d} {r['rps']:7.2f} {r['tokens_per_s']:8.1f} "
            f"{_ms(r['ttft_p50_ms']) + ' / ' + _ms(r['ttft_p99_ms']):>16s} "
            f"{_ms(r['itl_p50_ms']) + ' / ' + _ms(r['itl_p99_ms']):>15s} "
            f"{r['tokens_per_request'] or 0:7.1f} {batch:>5s} {r['errors']:6d}"
        )
    lines.append(
        f"{'offline':12s} {BATCH:7d} {'':7s} {offline_rate:8.1f}   (model.generate, batches of {BATCH})"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", help="required")
    parser.add_argument("--model-uri", help="required: a registered causal LM version")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--duration-s", type=float, default=30.0, help="per level and server")
    parser.add_argument("--requests", type=int, help="at most this many per level and server")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--replica-cpus", type=float, default=0.0)
    parser.add_argument("--offline-repeats", type=int, default=3)
    parser.add_argument("--timeout-s", type=float, default=600.0, help="one streamed request")
    parser.add_argument(
        "--ray-address", help="an existing cluster (only this script's application is removed)"
    )
    parser.add_argument("--out", default="generate_load", help="results/NAME.json")
    parser.add_argument("--bare-server", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        bare_server(args.bare_server, args.port, args.threads)
        return
    if not (args.tracking_uri and args.model_uri):
        parser.error("give --tracking-uri and --model-uri (a registered causal LM version)")
    host = (args.ray_address or "local").removeprefix("ray://").rsplit(":", 1)[0]
    if host in ("local", "localhost") or host.startswith("127."):
        # Ray on this machine listens on 127.0.0.1 only; Ray reads the switch on import.
        bind_to_loopback()

    from lepton_ray.serve.load import run_stream_load
    from lepton_ray.tracking.mlflow import download_model, get_model_version

    levels = [int(c) for c in args.clients.split(",")]
    bodies = chat_bodies(args.max_tokens)
    version = get_model_version(args.tracking_uri, args.model_uri)
    tags = dict(version.tags or {})
    work = Path(tempfile.mkdtemp(prefix="lr-generate-load-"))
    folder = download_model(args.tracking_uri, args.model_uri, work / "model")
    info = machine()
    print(
        f"[bench] {info['cpu']} x{info['nproc']}; model {args.model_uri} "
        f"({tags.get('lepton.quantization', 'none')}); {len(PROMPTS)} prompts, "
        f"max_tokens {args.max_tokens}, torch threads {args.threads}",
        flush=True,
    )
    results: dict[str, Any] = {
        "machine": info,
        "model": args.model_uri,
        "quantization": tags.get("lepton.quantization", "none"),
        "prompts": len(PROMPTS),
        "max_tokens": args.max_tokens,
        "temperature": 0.0,
        "torch_threads": args.threads,
        "replica_cpus": args.replica_cpus,
        "generation_batch_size": BATCH,
        "duration_s_per_level": args.duration_s,
        "requests_per_level": args.requests,
        "ray_address": args.ray_address or "private (in-process)",
        "levels": [],
    }
    app_name = f"generate-load-{os.getpid()}"
    bare, private = None, True
    try:
        bare, bare_url = start_bare(__file__, folder, args.threads, work / "bare.log")
        results["offline"] = offline(folder, args.max_tokens, args.threads, args.offline_repeats)
        print(f"[bench] offline batches of {BATCH}: {results['offline']}", flush=True)
        url, private = start_endpoint(args, args.threads, app_name)

        def measure(name: str, base: str, clients: int) -> dict:
            target = f"{base}/v1/chat/completions"
            run_stream_load(target, bodies, clients, 600, max_requests=clients)  # warm-up
            engine = name == "lepton-ray"
            with RunningSampler(f"{base}/healthz") if engine else nullcontext() as sampler:
                r = run_stream_load(
                    target,
                    bodies,
                    clients,
                    args.duration_s,
                    max_requests=args.requests,
                    timeout_s=args.timeout_s,
                ).summary()
            r["server"] = name
            if engine:
                r.update(sampler.summary())
            print(
                f"[bench] {name:12s} {clients:3d} clients: {r['tokens_per_s']:8.1f} tok/s  "
                f"{r['rps']:6.2f} req/s  TTFT p50 {r['ttft_p50_ms']} ms  "
                f"ITL p50 {r['itl_p50_ms']} ms  {r['statuses']}",
                flush=True,
            )
            return r

        for clients in levels:
            results["levels"].append(measure("lepton-ray", url, clients))
            results["levels"].append(measure("bare FastAPI", bare_url, clients))
    finally:
        if bare is not None:
            bare.terminate()
            try:
                bare.wait(timeout=30)
            except subprocess.TimeoutExpired:
                bare.kill()
        stop_endpoint(app_name, private)
        shutil.rmtree(work, ignore_errors=True)

    by = {(r["server"], r["clients"]): r for r in results["levels"]}
    offline_rate = results["offline"]["tokens_per_s"]
    ratios = {}
    for clients in levels:
        ours, bare_r = by[("lepton-ray", clients)], by[("bare FastAPI", clients)]
        ratios[str(clients)] = (
            round(ours["tokens_per_s"] / bare_r["tokens_per_s"], 2)
            if bare_r["tokens_per_s"]
            else None
        )
    results["endpoint_vs_bare_tokens_per_s"] = ratios
    top = by.get(("lepton-ray", BATCH))
    results["endpoint_16_vs_offline"] = (
        round(top["tokens_per_s"] / offline_rate, 2) if top and offline_rate else None
    )
    print()
    print(table(results["levels"], offline_rate))
    print("\nendpoint / bare (tok/s): " + ", ".join(f"{c} clients {r}x" for c, r in ratios.items()))
    if results["endpoint_16_vs_offline"] is not None:
        print(
            f"endpoint at {BATCH} clients / offline batched: "
            f"{results['endpoint_16_vs_offline']} (goal >= 0.7)"
        )
    print(f"[bench] wrote {write(args.out, results)}")


if __name__ == "__main__":
    main()
