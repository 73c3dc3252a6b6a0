"""The Prometheus series of a serving replica, in a registry of its own."""


class _Metrics:
    """The replica's Prometheus series, in a registry of its own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lepton_serve_requests",
            "HTTP requests answered by this replica.",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lepton_serve_request_seconds",
            "Seconds from request to response, by route.",
            ["route"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.batch = Histogram(
            "lepton_serve_batch_texts",
            "Texts per forward pass.",
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.forward = Histogram(
            "lepton_serve_batch_seconds",
            "Seconds per batch in the model (cleaning, tokenizing, forward pass).",
            registry=self.registry,
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
        )
        self.shed = Counter(
            "lepton_serve_shed_requests",
            "Requests refused with 503 because max_queued_texts were already waiting.",
            registry=self.registry,
        )
        self.queued = Gauge(
            "lepton_serve_queued_texts",
            "Texts held for the model now (running or waiting).",
            registry=self.registry,
        )
        self.body_bytes = Gauge(
            "lepton_serve_body_bytes_in_flight",
            "Bytes of the request bodies admitted and not yet answered.",
            registry=self.registry,
        )
        self.body_bytes_peak = Gauge(
            "lepton_serve_body_bytes_in_flight_peak",
            "The most body bytes ever in flight at once (never above max_body_bytes_in_flight).",
            registry=self.registry,
        )
        # A language model's replica (the generation app):
        self.generated = Counter(
            "lepton_serve_generated_tokens",
            "Tokens generated (rate() of it: tokens/s).",
            registry=self.registry,
        )
        self.tokens_per_s = Gauge(
            "lepton_serve_generated_tokens_per_second",
            "Tokens generated per second over the last 10 seconds.",
            registry=self.registry,
        )
        self.first_token = Histogram(
            "lepton_serve_time_to_first_token_seconds",
            "Seconds from a request's admission to its first generated token.",
            registry=self.registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.cancelled = Counter(
            "lepton_serve_cancelled_generations",
            "Generations stopped before their end because the client went away.",
            registry=self.registry,
        )
        self.waiting = Gauge(
            "lepton_serve_waiting_sequences",
            "Requests queued for a place in the generation batch.",
            registry=self.registry,
        )
        self.running = Gauge(
            "lepton_serve_running_sequences",
            "Requests in the generation batch now.",
            registry=self.registry,
        )
        self.model = Gauge(
            "lepton_serve_model_info",
            "1 for the registered version being served.",
            ["model", "version"],
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
