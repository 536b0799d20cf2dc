"""The broker's Prometheus metrics: one scrape covers the whole cluster.

The broker core reports what happens through the ``on_...`` hooks of a :class:`BrokerMetrics`;
the base class does nothing, so the routing code never asks whether metrics are on.
:class:`PrometheusMetrics` turns the hooks into counters and histograms, and keeps the latest
sample of the core's state (nodes, queues, requests in flight) for gauges read at scrape time.

Nodes add their own figures as ``stats``: cumulative counters since the node started, e.g.
``{"cache_hits": 12, "cache_misses": 3}``, sent in heartbeats and job results. The broker keeps
the latest figures of every node and exports their sums per service and model, so a node that
reports a new counter needs no change here.

Series are kept only for models a node serves: model names come from clients and nodes, so a
series for every name ever seen would grow without bound. A request for a model no node serves is
counted under ``other``; once a model has had no node for ``SERIES_GRACE`` seconds, its series go.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

OUTCOMES = ("completed", "failed", "cancelled")
MAX_STATS = 64  # counters kept per report; more are dropped
MAX_STAT_NAME = 64
MAX_NODES_KEPT = 1024  # nodes whose figures are kept one by one; older ones are folded into a sum
OTHER_MODEL = "other"  # the label of a request for a model no node serves
SERIES_GRACE = 600.0  # seconds a model may go without a node (a restart, a redeploy) before its series go

_STAT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def clean_stats(stats: Any) -> dict[str, float]:
    """The well-formed part of a node's ``stats``: names like identifiers, finite numbers >= 0."""
    if not isinstance(stats, Mapping):
        return {}
    clean: dict[str, float] = {}
    for name, value in stats.items():
        if len(clean) >= MAX_STATS:
            break
        if not (isinstance(name, str) and len(name) <= MAX_STAT_NAME and _STAT_NAME.match(name)):
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            continue
        clean[name] = value
    return clean


class BrokerMetrics:
    """What the broker core reports; every hook is a no-op here."""

    def on_request_finished(self, model: str, outcome: str, seconds: float | None = None) -> None:
        """A request ended: ``outcome`` is completed, failed or cancelled; completed ones give
        the ``seconds`` since they were accepted."""

    def on_job_finished(self, stage: str, model: str, seconds: float) -> None:
        """A node returned a ``stage`` job's result ``seconds`` after it was assigned."""

    def on_steps(self, stage: str, model: str, steps: int, seconds: float) -> None:
        """A node reported ``steps`` more steps of a job, ``seconds`` after its previous report."""

    def on_node_stats(self, service: str, model: str, node: str, stats: dict[str, float]) -> None:
        """A node's latest cumulative counters (already cleaned)."""

    def on_tick(self, workers: Iterable[Any], queues: Mapping[tuple[str, str], Any], requests_in_flight: int) -> None:
        """The core's state: registered workers (``.service``, ``.model``) and job queues by (service, model)."""


class PrometheusMetrics(BrokerMetrics):
    """Counters and histograms in a registry of their own, served by :meth:`serve`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Histogram,
            gc_collector,
            platform_collector,
            process_collector,
        )

        self.registry = CollectorRegistry()
        process_collector.ProcessCollector(registry=self.registry)
        platform_collector.PlatformCollector(registry=self.registry)
        gc_collector.GCCollector(registry=self.registry)
        self.requests = Counter(
            "triptych_requests",
            "Requests that ended, by model and outcome (completed, failed, cancelled).",
            ["outcome", "model"],  # the model last, as in every series labelled by model
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "triptych_request_seconds",
            "Time from acceptance to the last image, of completed requests.",
            ["model"],
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600),
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "triptych_stage_seconds",
            "Time a job spent on a node, from assignment to result, by stage (encode, denoise, decode).",
            ["stage", "model"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.step_seconds = Histogram(
            "triptych_step_seconds",
            "Time per step of a stage that reports steps (denoise), measured between consecutive reports.",
            ["stage", "model"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.clock = clock
        self._served: set[str] = set()  # models of the registered nodes (broker thread only)
        self._unserved_since: dict[str, float] = {}  # models with series but no node, since when
        self._series: dict[str, set[tuple[Any, tuple[str, ...]]]] = {}  # model -> (metric, label values) it has
        self._lock = threading.Lock()  # guards what the scrape thread reads below
        self._nodes: dict[tuple[str, str], int] = {}
        self._queues: dict[tuple[str, str], int] = {}
        self._in_flight = 0
        self._stats: OrderedDict[tuple[str, str, str], dict[str, float]] = OrderedDict()
        self._retired: dict[tuple[str, str], dict[str, float]] = {}  # sums of nodes no longer kept one by one
        self.registry.register(_StateCollector(self))

    # --- hooks (broker thread) -----------------------------------------------------------------

    def _labelled(self, metric: Any, model: str, *values: str) -> Any:
        """``metric`` for a model's series (``other`` for one no node serves), remembered for removal.
        ``values`` are its other labels, in order; the model is every such metric's last label."""
        label = model if model in self._served else OTHER_MODEL
        labels = (*values, label)
        self._series.setdefault(label, set()).add((metric, labels))
        return metric.labels(*labels)

    def on_request_finished(self, model: str, outcome: str, seconds: float | None = None) -> None:
        self._labelled(self.requests, model, outcome).inc()
        if seconds is not None:
            self._labelled(self.request_seconds, model).observe(seconds)

    def on_job_finished(self, stage: str, model: str, seconds: float) -> None:
        self._labelled(self.stage_seconds, model, stage).observe(seconds)

    def on_steps(self, stage: str, model: str, steps: int, seconds: float) -> None:
        histogram = self._labelled(self.step_seconds, model, stage)
        for _ in range(min(steps, 1000)):
            histogram.observe(seconds / steps)

    def on_node_stats(self, service: str, model: str, node: str, stats: dict[str, float]) -> None:
        if model not in self._served:
            return
        key = (service, model, node)
        with self._lock:
            self._stats[key] = stats
            self._stats.move_to_end(key)
            while len(self._stats) > MAX_NODES_KEPT:
                (old_service, old_model, _), old = self._stats.popitem(last=False)
                retired = self._retired.setdefault((old_service, old_model), {})
                for name, value in old.items():
                    retired[name] = retired.get(name, 0) + value

    def on_tick(self, workers: Iterable[Any], queues: Mapping[tuple[str, str], Any], requests_in_flight: int) -> None:
        nodes: dict[tuple[str, str], int] = {}
        for worker in workers:
            nodes[(worker.service, worker.model)] = nodes.get((worker.service, worker.model), 0) + 1
        self._served = {model for _, model in nodes}
        # The queues of served models, empty ones too; others only while they hold jobs (clients choose those names).
        depths = dict.fromkeys(nodes, 0) | {key: len(q) for key, q in queues.items() if len(q)}
        with self._lock:
            self._nodes, self._queues, self._in_flight = nodes, depths, requests_in_flight
        self._forget_unserved()

    def _forget_unserved(self) -> None:
        """Drop the series and node figures of models that have had no node for SERIES_GRACE seconds."""
        now = self.clock()
        with self._lock:
            kept = {model for _, model, _ in self._stats} | {model for _, model in self._retired}
        for model in (set(self._series) | kept) - self._served - {OTHER_MODEL}:
            since = self._unserved_since.setdefault(model, now)
            if now - since < SERIES_GRACE:
                continue
            del self._unserved_since[model]
            for metric, labels in self._series.pop(model, ()):
                metric.remove(*labels)
            with self._lock:
                for key in [key for key in self._stats if key[1] == model]:
                    del self._stats[key]
                for key in [key for key in self._retired if key[1] == model]:
                    del self._retired[key]
        for model in self._served:
            self._unserved_since.pop(model, None)

    # --- scrape (HTTP thread) ------------------------------------------------------------------

    def state(self) -> tuple[dict, dict, int, dict[tuple[str, str], dict[str, float]]]:
        """Nodes and queue depths by (service, model), requests in flight, node stat sums."""
        with self._lock:
            totals = {key: dict(values) for key, values in self._retired.items()}
            for (service, model, _), stats in self._stats.items():
                sums = totals.setdefault((service, model), {})
                for name, value in stats.items():
                    sums[name] = sums.get(name, 0) + value
            return dict(self._nodes), dict(self._queues), self._in_flight, totals

    def serve(self, host: str, port: int) -> Any:
        """Serve ``/metrics`` over HTTP on a daemon thread; returns the server (``.shutdown()``)."""
        from prometheus_client import start_http_server

        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server


class _StateCollector:
    """Gauges read from the last state sample, and the sums of the nodes' own counters."""

    def __init__(self, metrics: PrometheusMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        nodes, queues, in_flight, totals = self.metrics.state()
        node_gauge = GaugeMetricFamily(
            "triptych_nodes", "Registered nodes, by service and model.", labels=["service", "model"]
        )
        for (service, model), count in sorted(nodes.items()):
            node_gauge.add_metric([service, model], count)
        yield node_gauge
        queue_gauge = GaugeMetricFamily(
            "triptych_queue_depth", "Jobs waiting for a node, by service and model.", labels=["service", "model"]
        )
        for (service, model), depth in sorted(queues.items()):
            queue_gauge.add_metric([service, model], depth)
        yield queue_gauge
        yield GaugeMetricFamily("triptych_requests_in_flight", "Requests accepted and not yet ended.", value=in_flight)
        stat_counter = CounterMetricFamily(
            "triptych_node_stat",
            "Counters the nodes report (their stats), summed over the nodes of a service and model.",
            labels=["service", "model", "stat"],
        )
        ratio = GaugeMetricFamily(
            "triptych_cache_hit_ratio",
            "cache_hits / (cache_hits + cache_misses) as reported by the nodes, by service and model.",
            labels=["service", "model"],
        )
        per_image = GaugeMetricFamily(
            "triptych_stage_seconds_per_image",
            "busy_seconds / images as reported by the nodes, by service and model: node-seconds of work per "
            "image, so nodes / this is the images per second a stage keeps up with.",
            labels=["service", "model"],
        )
        for (service, model), sums in sorted(totals.items()):
            for name, value in sorted(sums.items()):
                stat_counter.add_metric([service, model, name], value)
            lookups = sums.get("cache_hits", 0) + sums.get("cache_misses", 0)
            if lookups > 0:
                ratio.add_metric([service, model], sums.get("cache_hits", 0) / lookups)
            if sums.get("images", 0) > 0 and "busy_seconds" in sums:
                per_image.add_metric([service, model], sums["busy_seconds"] / sums["images"])
        yield stat_counter
        yield ratio
        yield per_image
