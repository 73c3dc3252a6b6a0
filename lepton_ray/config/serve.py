"""The ``serve`` section: the Ray Serve deployment (HTTP, batching, load shedding, limits,
API key, prediction logging)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from lepton_ray.config.base import Section


class ServeSection(Section):
    enabled: bool = True
    host: str = Field(
        "127.0.0.1",
        description="HTTP host of the Serve proxy. Anything but loopback needs api_key_env.",
    )
    port: int = Field(8000, ge=1, le=65535)
    app_name: str | None = Field(None, description="Serve application name; default: name.")
    route_prefix: str = "/"
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0.0, description="CPUs reserved per replica.")
    torch_threads: int | None = Field(None, ge=1, description="Default: every core of the host.")
    max_batch_size: int = Field(32, ge=1, description="Texts batched per forward pass.")
    max_concurrent_batches: int = Field(
        1,
        ge=1,
        description="Forward passes a replica runs at once (1 on a CPU: one uses all cores).",
    )
    batch_wait_timeout_s: float = Field(
        0.002, ge=0.0, description="Seconds a batch waits to fill once its first text arrives."
    )
    adaptive_batch_wait: bool = Field(
        True,
        description="Skip the batch wait when a request is the only one in the replica "
        "(nothing could join its batch).",
    )
    max_queued_texts: int | None = Field(
        None,
        ge=1,
        description="Texts a replica holds for its model (running and waiting) before it sheds "
        "new requests with 503 + Retry-After. Default: 4 x max_batch_size x "
        "max_concurrent_batches.",
    )
    max_ongoing_requests: int | None = Field(
        None,
        ge=1,
        description="Requests Ray Serve sends one replica at once (Ray's own default, 5, caps a "
        "batch at 5 single-text requests). Default: max_queued_texts + 64, so every queued text "
        "can come from its own request and /healthz and slow uploads never wait for a slot.",
    )
    max_queued_requests: int | None = Field(
        None,
        ge=1,
        description="Requests Ray Serve's router holds when every replica slot is taken; more get "
        "503 + Retry-After. Default: max_ongoing_requests.",
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After of a 503 (shed load).")
    body_timeout_s: float = Field(
        5.0, gt=0.0, description="A request body that does not arrive within this gets 408."
    )
    max_body_bytes_in_flight: int = Field(
        64 * 2**20,
        ge=65_536,
        description="Bytes of request bodies a replica holds at once (bytes; 64 MiB), admitted "
        "before they are read; one more request gets 503 + Retry-After, and a body larger "
        "than this alone gets 413.",
    )
    request_timeout_s: float = Field(
        60.0, gt=0.0, description="End-to-end limit of one request at the proxy (408 beyond)."
    )
    keep_alive_timeout_s: int = Field(
        5, ge=1, description="Idle keep-alive connections are closed after this many seconds."
    )
    api_key_env: str | None = Field(
        None,
        description="Environment variable holding the API key; then every route but /healthz "
        "needs 'Authorization: Bearer KEY' (401 otherwise).",
    )
    access_log: bool = Field(
        False,
        description="Ray Serve's per-request access log lines (off: they cost CPU per request; "
        "/metrics counts requests by route and status).",
    )
    log_sample_rate: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Fraction of predictions logged (text hash, label, probability, version).",
    )
    log_sample_path: Path | None = Field(
        None,
        description="JSONL file of the logged sample; default OUTPUT/NAME/serve/predictions.jsonl.",
    )
    max_texts_per_request: int = Field(256, ge=1)
    max_chars_per_text: int = Field(
        20_000, ge=1, description="Longer texts are refused with 413 before they reach a batch."
    )
    max_tokens_limit: int = Field(
        512,
        ge=1,
        description="A language model's endpoint: the most max_tokens a request may ask "
        "(more is a 400).",
    )
    default_max_tokens: int = Field(
        128, ge=1, description="A language model's endpoint: max_tokens when a request gives none."
    )
    engine: Literal["auto", "hf", "vllm"] = Field(
        "auto",
        description="A language model's engine: 'hf' (lepton-ray's own, continuous batching; "
        "CPUs or GPUs), 'vllm' (ray.serve.llm with vLLM; needs vLLM and a GPU in the cluster, "
        "and checks no API key, so it refuses to run with api_key_env), 'auto' (vllm where it "
        "can run and no API key is asked for, else hf). Both answer the same OpenAI routes.",
    )
    generation_batch_size: int = Field(
        8,
        ge=1,
        description="A language model's endpoint: sequences decoded together (continuous "
        "batching: a finished one leaves, a waiting one joins at the next step).",
    )
    example_texts: list[str] = Field(
        default_factory=list, description="Texts the pipeline sends after it deploys."
    )

    @field_validator("log_sample_path")
    @classmethod
    def _absolute_sample(cls, value: Path | None) -> Path | None:
        return value.resolve() if value is not None else None

    @model_validator(mode="after")
    def _exposed_needs_a_key(self) -> ServeSection:
        if not is_loopback(self.host) and not self.api_key_env:
            raise ValueError(
                f"serve.host {self.host!r} is reachable from other machines, and the endpoint has "
                "no API key: set serve.api_key_env to the name of an environment variable that "
                "holds one (or keep serve.host: 127.0.0.1)"
            )
        return self

    @property
    def queued_texts(self) -> int:
        return self.max_queued_texts or 4 * self.max_batch_size * self.max_concurrent_batches

    @property
    def ongoing_requests(self) -> int:
        return serve_slots(self.queued_texts, self.max_ongoing_requests)[0]

    @property
    def queued_requests(self) -> int:
        return serve_slots(self.queued_texts, self.max_ongoing_requests, self.max_queued_requests)[
            1
        ]


def serve_slots(
    queued_texts: int, ongoing: int | None = None, queued: int | None = None
) -> tuple[int, int]:
    """Ray Serve's ``(max_ongoing_requests, max_queued_requests)`` for a replica that holds
    ``queued_texts``: room for each queued text as its own request plus 64 for /healthz and
    uploads in flight, and a router queue as large; explicit values win."""
    ongoing = ongoing or queued_texts + 64
    return ongoing, queued or ongoing


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
