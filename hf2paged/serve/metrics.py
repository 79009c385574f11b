"""Prometheus metrics of the server (`GET /metrics`), on a registry of its own.

Engine state (requests running and waiting, KV blocks, preemptions, steps) is read from
the engine's latest `EngineStats` at each scrape; requests, tokens and latencies are
counted as the engine hands them out (`ServerMetrics` is the engine's `RequestObserver`,
and a collector of its own plain counters); HTTP responses are counted by route and
status by `HTTPMetricsMiddleware`.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import (
    CollectorRegistry,
    Counter,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from runtime.engine.async_llm import AsyncLLM, RequestObserver

PREFIX = "hf2paged"
# Latency buckets (seconds): TTFT spans queueing behind long prompts; ITL one step.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
               0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)  # fmt: skip
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)


class EngineCollector(Collector):
    """Gauges (and counters) read from the engine's latest stats at scrape time."""

    def __init__(self, engine: AsyncLLM) -> None:
        self.engine = engine

    def collect(self):
        stats = self.engine.stats
        gauges = (
            ("num_requests_running", "Requests in the running batch.", stats.num_running),
            ("num_requests_waiting", "Requests waiting to be scheduled.", self.engine.num_waiting),
            ("kv_cache_blocks", "KV-cache blocks in all.", stats.num_blocks),
            ("kv_cache_free_blocks", "KV-cache blocks free.", stats.num_free_blocks),
            ("kv_cache_used_blocks", "KV-cache blocks in use.",
             stats.num_blocks - stats.num_free_blocks),
        )  # fmt: skip
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        usage = (stats.num_blocks - stats.num_free_blocks) / max(stats.num_blocks, 1)
        yield GaugeMetricFamily(
            f"{PREFIX}_kv_cache_usage_ratio", "Share of KV-cache blocks in use.", value=usage
        )
        yield CounterMetricFamily(
            f"{PREFIX}_num_preemptions", "Sequences preempted (recomputed later).",
            value=stats.num_preemptions,
        )  # fmt: skip
        yield CounterMetricFamily(
            f"{PREFIX}_engine_steps", "Engine steps that produced tokens.", value=stats.num_steps
        )


class LatencyHistogram:
    """A histogram fed on the event loop only, so it needs no lock: a bisect and an add per
    observation (prometheus-client's Histogram locks twice and scans every bucket; at
    thousands of tokens per second that is the server's largest cost after JSON)."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = list(buckets)
        self.counts = [0] * (len(buckets) + 1)  # the last one: above every bound
        self.sum = 0.0

    def observe(self, values: list[float]) -> None:
        counts, bounds = self.counts, self.bounds
        for v in values:
            counts[bisect_left(bounds, v)] += 1
        self.sum += sum(values)

    def family(self) -> HistogramMetricFamily:
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.counts):
            cumulative += count
            buckets.append((bound, cumulative))
        return HistogramMetricFamily(
            self.name, self.documentation, buckets=buckets, sum_value=self.sum
        )


class ServerMetrics(RequestObserver, Collector):
    """The server's registry, and the engine's observer of first tokens, gaps and finishes
    (plain counters updated on the event loop, turned into metrics at scrape time)."""

    def __init__(self) -> None:
        disable_created_metrics()  # no `*_created` series: they double the page for nothing
        self.registry = CollectorRegistry(auto_describe=True)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}
        self.ttft = LatencyHistogram(
            f"{PREFIX}_time_to_first_token_seconds", "From arrival to the first token.",
            TTFT_BUCKETS,
        )  # fmt: skip
        self.itl = LatencyHistogram(
            f"{PREFIX}_inter_token_latency_seconds", "Between two tokens of one request.",
            ITL_BUCKETS,
        )  # fmt: skip
        self.e2e = LatencyHistogram(
            f"{PREFIX}_e2e_request_latency_seconds", "From arrival to the finish.", E2E_BUCKETS
        )
        self.responses = Counter(
            f"{PREFIX}_http_responses", "HTTP responses, by route and status code.",
            ["route", "status"], registry=self.registry,
        )  # fmt: skip
        self.registry.register(self)

    def attach(self, engine: AsyncLLM) -> None:
        self.registry.register(EngineCollector(engine))
        engine.observer = self

    # RequestObserver
    def on_step(self, first_token_latencies: list[float], inter_token_latencies: list[float]):
        self.ttft.observe(first_token_latencies)
        self.itl.observe(inter_token_latencies)
        self.generation_tokens += len(first_token_latencies) + len(inter_token_latencies)

    def on_finished(
        self, finish_reason: str, num_prompt_tokens: int, num_output_tokens: int, latency: float
    ) -> None:
        self.finished[finish_reason] = self.finished.get(finish_reason, 0) + 1
        self.prompt_tokens += num_prompt_tokens
        self.e2e.observe([latency])

    # Collector
    def collect(self):
        yield CounterMetricFamily(
            f"{PREFIX}_prompt_tokens", "Prompt tokens of finished requests (each of n samples).",
            value=self.prompt_tokens,
        )  # fmt: skip
        yield CounterMetricFamily(
            f"{PREFIX}_generation_tokens", "Tokens generated and handed out.",
            value=self.generation_tokens,
        )  # fmt: skip
        finished = CounterMetricFamily(
            f"{PREFIX}_requests_finished", "Engine requests (samples) finished, by reason.",
            labels=["finish_reason"],
        )  # fmt: skip
        for reason, count in sorted(self.finished.items()):
            finished.add_metric([reason], count)
        yield finished
        yield self.ttft.family()
        yield self.itl.family()
        yield self.e2e.family()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HTTPMetricsMiddleware:
    """Counts responses by route (the path of a known route, else "other") and status."""

    def __init__(self, app, metrics: ServerMetrics, routes: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in self.routes else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.responses.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, send=counting_send)
