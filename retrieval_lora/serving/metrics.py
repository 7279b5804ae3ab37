"""Prometheus metrics of the HTTP server (`GET /metrics`), with the official `prometheus_client`.

Each app gets its own `CollectorRegistry` (no process-global state, so several apps or tests
never share counters). Two kinds of metrics:
- Per request, updated by the edge middleware (edge.py):
  `retrieval_lora_requests_total{endpoint, model, status}` and
  `retrieval_lora_request_duration_seconds{endpoint, model, status}` (histogram). `endpoint` is
  the route (unknown paths are "other"); `model` is the adapter name without version (or the
  base's name) once it resolved: a name the tenant may use and that exists. Otherwise "" (401,
  403, 404, a malformed body), so callers cannot make labels up and their number stays bounded.
- Read from the service at every scrape (`ServiceCollector`): per task, the rows and requests
  waiting (`retrieval_lora_queue_rows`, `retrieval_lora_queue_requests`), adapters in memory
  (`retrieval_lora_adapters_loaded`), forward passes, rows, rows per pass (histogram
  `retrieval_lora_batch_rows`), adapters per pass (`retrieval_lora_batch_adapters`), shared
  passes rerun request by request (`retrieval_lora_isolated_failures_total`) and requests
  turned away (`retrieval_lora_rejected_total{reason}`).

Example scrape config: `metrics_path: /metrics`, with `authorization: {credentials: KEY}`
when the server has keys (see app.py for who may read it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from retrieval_lora.serving.service import RetrievalService

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ADAPTER_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class RequestMetrics:
    """Request counts and latencies per endpoint, model and status, in `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["endpoint", "model", "status"]
        self.requests = Counter("retrieval_lora_requests", "HTTP requests answered", labels, registry=registry)
        self.latency = Histogram("retrieval_lora_request_duration_seconds", "time from request to answer",
                                 labels, buckets=LATENCY_BUCKETS, registry=registry)

    def observe(self, endpoint: str, model: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, model, str(status)).inc()
        self.latency.labels(endpoint, model, str(status)).observe(seconds)


def _add_histogram(family: HistogramMetricFamily, task: str, counts: dict[int, int], buckets: tuple) -> None:
    """One task's histogram from exact value -> count pairs (values are small whole numbers)."""
    cumulative = [(str(bound), sum(n for value, n in counts.items() if value <= bound)) for bound in buckets]
    cumulative.append(("+Inf", sum(counts.values())))
    family.add_metric([task], cumulative, sum_value=float(sum(value * n for value, n in counts.items())))


class ServiceCollector(Collector):
    """Queue depth, batches and loaded adapters of a `RetrievalService`, read at scrape time."""

    def __init__(self, service: RetrievalService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        queue_rows = GaugeMetricFamily("retrieval_lora_queue_rows", "rows waiting for a forward pass", labels=["task"])
        queue_requests = GaugeMetricFamily("retrieval_lora_queue_requests", "requests waiting for a forward pass",
                                           labels=["task"])
        isolated = CounterMetricFamily("retrieval_lora_isolated_failures", "shared forward passes that failed and "
                                       "were rerun request by request", labels=["task"])
        rejected = CounterMetricFamily("retrieval_lora_rejected", "requests turned away by the queue bounds",
                                       labels=["task", "reason"])
        for batcher in self.service.batchers():
            task = batcher.slot.task
            requests, rows = batcher.queued()
            queue_rows.add_metric([task], rows)
            queue_requests.add_metric([task], requests)
            isolated.add_metric([task], batcher.stats.isolated_failures)
            rejected.add_metric([task, "overloaded"], batcher.stats.rejected_overloaded)
            rejected.add_metric([task, "tenant_over_limit"], batcher.stats.rejected_tenant)
        yield from (queue_rows, queue_requests, isolated, rejected)
        loaded = GaugeMetricFamily("retrieval_lora_adapters_loaded", "adapters in memory", labels=["task"])
        passes = CounterMetricFamily("retrieval_lora_forward_passes", "forward passes run", labels=["task"])
        rows_total = CounterMetricFamily("retrieval_lora_rows", "rows (texts or pairs) run", labels=["task"])
        batch_rows = HistogramMetricFamily("retrieval_lora_batch_rows", "rows per forward pass", labels=["task"])
        batch_adapters = HistogramMetricFamily("retrieval_lora_batch_adapters", "distinct adapters (the base "
                                               "counts as one) per forward pass", labels=["task"])
        for slot in self.service.pool.slots():
            stats = slot.stats
            loaded.add_metric([slot.task], len(slot.loaded()))
            passes.add_metric([slot.task], stats.forward_passes)
            rows_total.add_metric([slot.task], stats.rows)
            _add_histogram(batch_rows, slot.task, dict(stats.passes_by_rows), ROW_BUCKETS)
            _add_histogram(batch_adapters, slot.task, dict(stats.passes_by_adapters), ADAPTER_BUCKETS)
        yield from (loaded, passes, rows_total, batch_rows, batch_adapters)


def metrics_registry(service: RetrievalService) -> tuple[CollectorRegistry, RequestMetrics]:
    """A fresh registry holding the request metrics and the service's collector."""
    registry = CollectorRegistry()
    registry.register(ServiceCollector(service))
    return registry, RequestMetrics(registry)


def exposition(registry: CollectorRegistry) -> bytes:
    """The Prometheus text format of everything in `registry`."""
    return generate_latest(registry)
