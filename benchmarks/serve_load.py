"""lepton-ray's Serve endpoint under load, beside a bare FastAPI server and offline batches.

    python benchmarks/serve_load.py --tracking-uri sqlite:////tmp/bench-sst2/mlflow.db \
        --model-uri models:/sst2-minilm-lora/2

One text per request, SST-2 dev sentences in order, a closed-loop asyncio client
(``lepton_ray.serve.load``) on loopback. For each load level (1, 8, 32, 64 clients) the
endpoint and the bare server are measured in turn, each after a short warm-up, in one run on
one machine, with both servers up. The bare server is FastAPI + uvicorn in its own process
running the same registered model through the same task ``predict``, one request at a time, no
batching. The offline figure is the same model over the same texts in batches of 32 in this
process. Then: knob variants at 32 clients (each one redeploys the endpoint), 1,000
malformed requests 16 at a time with valid ones mixed in, and a replica killed under load.
Ports are picked free on 127.0.0.1; nothing else is touched.
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, start_bare, write  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from lepton_ray.runtime.cluster import free_port  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared/data/sst2"


def dev_texts(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        return [row["sentence"] for row in csv.DictReader(f, delimiter="\t")]


# ------------------------------------------------------------------------------- bare server
def bare_server(folder: str, port: int, threads: int) -> None:
    """FastAPI + uvicorn, the same model and task ``predict``, no batching: the baseline."""
    import torch
    import uvicorn
    from fastapi import FastAPI

    from lepton_ray.compress.formats import load_model_artifact
    from lepton_ray.tasks import get_task

    torch.set_num_threads(threads)
    model, tokenizer, meta = load_model_artifact(Path(folder))
    classify = get_task(meta.task).predict
    app = FastAPI()

    @app.get("/healthz")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/predict")
    async def predict(body: Body):
        return {"predictions": classify(model, tokenizer, meta, body.texts)}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


class Body(BaseModel):
    texts: list[str]


# ----------------------------------------------------------------------------------- lepton
def endpoint_config(args, out: Path, port: int, **serve):
    from lepton_ray.config import ExperimentConfig

    return ExperimentConfig.model_validate(
        {
            "name": "serve-load",
            "output_dir": str(out),
            "data": {"path": str(args.data), "text_column": "sentence"},
            "tracking": {"tracking_uri": args.tracking_uri},
            "serve": {"port": port, "num_cpus": 0, **serve},
        }
    )


def replica_pid() -> int:
    from ray.util.state import list_actors

    actors = [
        a
        for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
        if a.class_name.startswith("ServeReplica:serve-load")
    ]
    if len(actors) != 1:
        raise SystemExit(f"expected one live replica, found {len(actors)}")
    return actors[0].pid


def offline(folder: Path, texts: list[str], threads: int, batch: int = 32) -> dict:
    import torch

    from lepton_ray.compress.formats import load_model_artifact
    from lepton_ray.tasks import get_task

    torch.set_num_threads(threads)
    model, tokenizer, meta = load_model_artifact(folder)
    classify_batched = get_task(meta.task).predict_batched
    classify_batched(model, tokenizer, meta, texts[:64], batch_size=batch)  # warm-up
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        classify_batched(model, tokenizer, meta, texts, batch_size=batch)
        rates.append(len(texts) / (time.perf_counter() - start))
    return {"batch_size": batch, "samples_per_s": round(sorted(rates)[1], 1), "rates": rates}


def kill_under_load(url: str, texts: list[str], clients: int, seconds: float, kill_at: float):
    from lepton_ray.serve.load import run_load

    pid = replica_pid()
    killed: dict[str, float] = {}

    def kill() -> None:
        time.sleep(kill_at)
        killed["at"] = time.perf_counter()
        os.kill(pid, signal.SIGKILL)

    threading.Thread(target=kill, daemon=True).start()
    start = time.perf_counter()
    result = run_load(f"{url}/v1/predict", texts, clients, seconds, timeout_s=60)
    kill_s = killed["at"] - start
    failures = [(t, s) for t, s in result.timeline if s != 200]
    after = [t for t, s in result.timeline if t > kill_s]
    last_failure = max((t for t, _ in failures), default=None)
    first_ok_after = next(
        (t for t, s in result.timeline if s == 200 and t > (last_failure or kill_s)), None
    )
    gaps = sorted(after)
    longest_gap = max((b - a for a, b in zip(gaps, gaps[1:])), default=0.0)
    return {
        "clients": clients,
        "seconds": seconds,
        "killed_at_s": round(kill_s, 2),
        "requests": result.requests,
        "failed": len(failures),
        "statuses": {str(k): v for k, v in result.statuses.items()},
        "recovered_after_s": None if first_ok_after is None else round(first_ok_after - kill_s, 2),
        "longest_gap_between_answers_s": round(longest_gap, 2),
        "new_replica_pid_differs": replica_pid() != pid,
    }


def swap_under_load(url: str, texts: list[str], cfg, target: str, clients: int = 8) -> dict:
    """Deploy ``target`` (same application: an in-place swap) while ``clients`` send texts."""
    from lepton_ray.serve.client import deploy
    from lepton_ray.serve.load import run_load

    window: dict[str, float] = {}

    def swap() -> None:
        time.sleep(4)
        window["start"] = time.perf_counter()
        deploy(cfg, target, log=lambda m: None)  # returns once /healthz reports the version
        window["end"] = time.perf_counter()

    thread = threading.Thread(target=swap, daemon=True)
    start = time.perf_counter()
    thread.start()
    result = run_load(f"{url}/v1/predict", texts, clients, 30, timeout_s=60, record_models=True)
    thread.join()
    lo, hi = window["start"] - start, window["end"] - start
    during = [
        ms
        for (t, s), ms in zip(
            [e for e in result.timeline if e[1] == 200], result.latencies_ms, strict=True
        )
        if lo <= t <= hi + 1
    ]
    out = result.summary()
    out.update(
        {
            "target": target,
            "swap_s": round(hi - lo, 2),
            "failed": result.requests - result.ok,
            "answered_by": dict(result.models),
            "p99_ms_during_swap": round(sorted(during)[int(0.99 * (len(during) - 1))], 1)
            if during
            else None,
        }
    )
    print(f"[bench] swap to {target} under {clients} clients: {out}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default="sqlite:////tmp/bench-sst2/mlflow.db")
    parser.add_argument("--model-uri", default="models:/sst2-minilm-lora/2")
    parser.add_argument("--data", type=Path, default=SHARED / "dev.tsv")
    parser.add_argument("--clients", default="1,8,32,64")
    parser.add_argument("--seconds", type=float, default=15.0, help="per level and server")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--variants", default="ray_default_slots,access_log_on,torch_threads_1,wait_10ms"
    )
    parser.add_argument("--skip-robustness", action="store_true")
    parser.add_argument("--ingress", default="haproxy,proxy", help="first: the full run")
    parser.add_argument(
        "--ab", help="only A/B at 32 clients: the defaults against this variant, alternating"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --ab")
    parser.add_argument(
        "--swap-to", help="only: swap the endpoint to this version (and back) under 8 clients"
    )
    parser.add_argument("--out", default=f"serve_load-{time.strftime('%Y-%m-%d')}")
    parser.add_argument("--bare-server", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        bare_server(args.bare_server, args.port, args.threads)
        return
    if not args.data.exists():
        raise SystemExit(f"{args.data} not found: this benchmark reads SST-2 dev from ../shared")

    from ray import serve

    from lepton_ray.serve.client import deploy
    from lepton_ray.serve.load import run_load, send_malformed
    from lepton_ray.tracking.mlflow import download_model, get_model_version

    texts = dev_texts(args.data)
    version = get_model_version(args.tracking_uri, args.model_uri)
    folder = download_model(args.tracking_uri, args.model_uri)
    info = machine()
    tags = dict(version.tags or {})
    print(
        f"[bench] {info['cpu']} x{info['nproc']}; model {args.model_uri} "
        f"({tags.get('lepton.quantization', 'none')}); {len(texts)} texts",
        flush=True,
    )
    out = Path(tempfile.mkdtemp(prefix="lr-serve-load-"))
    results: dict = {
        "machine": info,
        "model": args.model_uri,
        "quantization": tags.get("lepton.quantization", "none"),
        "texts": len(texts),
        "seconds_per_level": args.seconds,
        "levels": [],
        "variants": [],
    }
    levels = [int(c) for c in args.clients.split(",")]
    knobs = {
        "ray_default_slots": {"max_ongoing_requests": 5, "max_queued_requests": 1000},
        "torch_threads_1": {"torch_threads": 1},
        "wait_10ms": {"batch_wait_timeout_s": 0.01},
        "wait_0": {"batch_wait_timeout_s": 0.0},
        "batch_16": {"max_batch_size": 16},
        "access_log_on": {"access_log": True},
        "fixed_wait": {"adaptive_batch_wait": False},
    }

    def measure(name: str, target: str, clients: int) -> dict:
        run_load(target, texts, clients, args.warmup)
        r = run_load(target, texts, clients, args.seconds).summary()
        r["server"] = name
        print(
            f"[bench] {name:22s} {clients:3d} clients: {r['rps']:7.1f} req/s  "
            f"p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  {r['statuses']}",
            flush=True,
        )
        return r

    if args.swap_to:
        url, cfg, _ = start_endpoint(args, out, args.ingress.split(",")[0])
        try:
            results["swap"] = [
                swap_under_load(url, texts, cfg, target)
                for target in (args.swap_to, args.model_uri)
            ]
        finally:
            stop_endpoint()
        print(f"[bench] wrote {write(args.out + '-swap', results)}")
        return
    if args.ab:
        url, cfg, port = start_endpoint(args, out, args.ingress.split(",")[0])
        variant = endpoint_config(args, out, port, **knobs[args.ab])
        results["ab"] = {"variant": args.ab, "settings": knobs[args.ab], "rounds": []}
        try:
            for _ in range(args.rounds):
                for name, c in (("defaults", cfg), (args.ab, variant)):
                    deploy(c, args.model_uri, log=lambda m: None)
                    results["ab"]["rounds"].append(measure(name, f"{url}/v1/predict", 32))
        finally:
            stop_endpoint()
        print(f"[bench] wrote {write(args.out + '-ab-' + args.ab, results)}")
        return
    bare, bare_url = start_bare(__file__, folder, args.threads)
    try:
        results["offline"] = offline(folder, texts, args.threads)
        print(f"[bench] offline batches of 32: {results['offline']['samples_per_s']} samples/s")
        for ingress in args.ingress.split(","):
            url, cfg, port = start_endpoint(args, out, ingress)
            name = f"lepton-ray ({ingress})"
            for clients in levels:
                results["levels"].append(measure(name, f"{url}/v1/predict", clients))
                if ingress == args.ingress.split(",")[0]:
                    results["levels"].append(
                        measure("bare FastAPI", f"{bare_url}/v1/predict", clients)
                    )
            if ingress != args.ingress.split(",")[0]:
                stop_endpoint()
                continue
            for variant in [v for v in args.variants.split(",") if v]:
                deploy(
                    endpoint_config(args, out, port, **knobs[variant]),
                    args.model_uri,
                    log=lambda m: None,
                )
                r = measure(f"variant {variant}", f"{url}/v1/predict", 32)
                r["variant"], r["settings"] = variant, knobs[variant]
                results["variants"].append(r)
            deploy(cfg, args.model_uri, log=lambda m: None)  # back to the defaults
            if not args.skip_robustness:
                bad = send_malformed(f"{url}/v1/predict", texts, n=1000, concurrency=16)
                results["malformed"] = bad.summary()
                print(f"[bench] malformed: {bad.summary()}", flush=True)
                results["kill"] = kill_under_load(url, texts, clients=8, seconds=40, kill_at=5)
                print(f"[bench] replica killed under load: {results['kill']}", flush=True)
            stop_endpoint()
    finally:
        bare.terminate()
        serve.shutdown()
    print(f"[bench] wrote {write(args.out, results)}")


def start_endpoint(args, out: Path, ingress: str):
    """A fresh in-process Ray with the given Serve ingress, and the endpoint on it."""
    from lepton_ray.config import ClusterSection
    from lepton_ray.runtime.cluster import init_ray
    from lepton_ray.serve.client import deploy

    for key in [k for k in os.environ if k.startswith("RAY_SERVE_") and "HAPROXY" in k]:
        del os.environ[key]
    os.environ.pop("RAY_SERVE_ENABLE_HA_PROXY", None)
    init_ray(
        ClusterSection(address="local", num_cpus=os.cpu_count(), serve_ingress=ingress), log=print
    )
    port = free_port()
    cfg = endpoint_config(args, out, port)
    url, _ = deploy(cfg, args.model_uri, log=lambda m: None)
    return url, cfg, port


def stop_endpoint() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
