"""Prometheus metrics of the OpenAI routes, in a registry of the app's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mome_requests", "Requests by route and status", ["route", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "mome_prompt_tokens", "Prompt tokens processed", registry=self.registry
        )
        self.generation_tokens = Counter(
            "mome_generation_tokens", "Tokens generated", registry=self.registry
        )
        self.latency = Histogram(
            "mome_request_latency_seconds", "End-to-end request latency", ["route"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "mome_time_to_first_token_seconds", "Time to first streamed token", ["route"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
            registry=self.registry,
        )
        self.provenance = Counter(
            "mome_provenance", "How each choice's mome_facts was found: the engine's record "
            "alone, or with its prompt or all its tokens recomputed (model/fired_log.py)",
            ["source"], registry=self.registry,
        )
        self.running = Gauge(
            "mome_requests_running", "Generation requests in flight", registry=self.registry
        )
