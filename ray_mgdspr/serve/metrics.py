"""The endpoint's metrics, recorded once and exported twice.

- **Through Ray** (``ray.serve.metrics``): every replica's series reach Prometheus through the metrics agent of
  its node (the node's metrics export port, ``ray start --metrics-export-port``), named ``ray_<name>`` and
  labelled with ``application``, ``deployment`` and ``replica``. Sums across replicas are right: this is what
  to scrape and alert on (docs/operations.md, "Metrics and alerts").
- **In this replica** (``prometheus_client``): ``GET /metrics`` of the ingress answers with the series of
  whichever ingress replica Serve routed the scrape to; a quick look, not a total.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client import Counter as LocalCounter
from prometheus_client import Gauge as LocalGauge
from prometheus_client import Histogram as LocalHistogram
from ray.serve import metrics as ray_metrics

STAGE_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)
BATCH_BUCKETS = tuple(n + 0.5 for n in range(65))
"""Bounds of the batch-size histogram, one bucket per size 1..64. Ray 2.60's export writes a histogram's ``_sum``
from its buckets' midpoints (measured: 20 batches of 1 in a (0, 1] bucket exported a ``_sum`` of 10, and Ray
Serve's own ``ray_serve_actual_batch_size`` reads a mean batch of 0.5 the same way), so each integer size sits at
a bucket's midpoint and ``rate(_sum) / rate(_count)`` is the exact mean batch size."""

GAUGE_REFRESH_S = 5.0
"""How often the ingress sets its gauges again (``ServingMetrics.republish``): within Ray's export interval
(``metrics_report_interval_ms``, 10 s by default), so a gauge series stays exported while its replica lives."""

METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "mgdspr_requests": ("counter", "HTTP requests by endpoint and status code", ("endpoint", "code")),
    "mgdspr_stage_seconds": ("histogram", "latency of each stage of /v1/retrieve", ("stage",)),
    "mgdspr_filtered_items": ("counter", "hits removed by the relevance filter", ()),
    "mgdspr_fallback_pages": ("counter", "responses the lexical fallback filled because the filter left fewer "
                              "than k embedding hits", ()),
    "mgdspr_relaxed_pages": ("counter", "responses filled with the query's product type because too few items "
                             "have every key term", ()),
    "mgdspr_retried_calls": ("counter", "reads retried on another replica after theirs died or was unavailable, "
                             "by stage", ("stage",)),
    "mgdspr_serving_version": ("gauge", "1 for the version this replica serves", ("version",)),
    "mgdspr_canary_recall": ("gauge", "recall canary: running recall@serve.canary_k of the ANN against the exact "
                             "search over this replica's last serve.canary_window samples, by version (average "
                             "over replicas: avg by (version))", ("version",)),
    "mgdspr_canary_samples": ("counter", "recall canary samples by version and outcome: ok (recorded), failed "
                              "(an error, logged), skipped (too many in flight)", ("version", "outcome")),
    "mgdspr_batch_size": ("histogram", "requests per batch of the encoder, the shards or the "
                          "whole version (stage version: placement inline or colocated; Ray's export only)",
                          ("stage",)),
}
"""Every metric the endpoint records: name -> (type, help, labels). Ray exports each as ``ray_<name>`` (counters
``ray_<name>_total``, histograms ``_bucket``/``_sum``/``_count``) with ``application``, ``deployment`` and
``replica`` labels added; the dashboards in ``clusters/monitoring/`` are checked against this table."""


def exported_series(prefix: str = "ray_") -> set[str]:
    """The Prometheus series names of ``METRICS`` as Ray's export writes them."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    return {f"{prefix}{name}{s}" for name, (kind, _, _) in METRICS.items() for s in suffixes[kind]}


class Metric:
    """One metric in both sinks; ``labels(*values)`` then ``inc`` / ``observe`` / ``set`` as prometheus_client."""

    def __init__(self, local: Any, exported: Any, label_names: tuple[str, ...]) -> None:
        self.local, self.exported, self.label_names = local, exported, label_names

    def labels(self, *values: str) -> _Series:
        return _Series(self, tuple(str(v) for v in values))

    def inc(self, amount: float = 1) -> None:
        self.labels().inc(amount)

    def observe(self, value: float) -> None:
        self.labels().observe(value)


class _Series:
    def __init__(self, metric: Metric, values: tuple[str, ...]) -> None:
        self.metric, self.values = metric, values
        self.tags = dict(zip(metric.label_names, values, strict=True))

    def _local(self) -> Any:
        return self.metric.local.labels(*self.values) if self.values else self.metric.local

    def inc(self, amount: float = 1) -> None:
        if amount > 0:  # Ray's counters take positive increments only
            self._local().inc(amount)
            self.metric.exported.inc(amount, tags=self.tags)

    def observe(self, value: float) -> None:
        self._local().observe(value)
        self.metric.exported.observe(value, tags=self.tags)

    def set(self, value: float) -> None:
        self._local().set(value)
        self.metric.exported.set(value, tags=self.tags)


class ServingMetrics:
    """The ingress's metrics (names without the ``_total`` suffix prometheus adds to counters)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = self._counter("mgdspr_requests")
        self.stage_seconds = self._histogram("mgdspr_stage_seconds")
        self.filtered = self._counter("mgdspr_filtered_items")
        self.fallbacks = self._counter("mgdspr_fallback_pages")
        self.relaxed = self._counter("mgdspr_relaxed_pages")
        self.retries = self._counter("mgdspr_retried_calls")
        _, doc, labels = METRICS["mgdspr_serving_version"]
        self._version = Metric(LocalGauge("mgdspr_serving_version", doc, list(labels), registry=self.registry),
                               ray_metrics.Gauge("mgdspr_serving_version", doc, tag_keys=labels), labels)
        self._serving: str | None = None
        _, doc, labels = METRICS["mgdspr_canary_recall"]
        self._canary_recall = Metric(LocalGauge("mgdspr_canary_recall", doc, list(labels), registry=self.registry),
                                     ray_metrics.Gauge("mgdspr_canary_recall", doc, tag_keys=labels), labels)
        self.canary_samples = self._counter("mgdspr_canary_samples")
        self._canary_values: dict[str, float] = {}

    def canary(self, version: str, recall: float) -> None:
        """The running recall of ``version`` in this replica's window (``canary.RecallWindow``) is ``recall``."""
        self._canary_values[version] = recall
        self._canary_recall.labels(version).set(recall)

    def republish(self) -> None:
        """Set the gauges again (the serving version, each version's canary recall): Ray's export drops a gauge
        series that was not set within two export intervals (measured with Ray 2.60: a canary gauge set once was
        gone from the node's export a minute later), so the ingress calls this every ``GAUGE_REFRESH_S``."""
        if self._serving is not None:
            self._version.labels(self._serving).set(1)
        for version, recall in self._canary_values.items():
            self._canary_recall.labels(version).set(recall)

    def serving(self, version: str) -> None:
        """This replica now serves ``version`` (the gauge of the one before drops to 0)."""
        if self._serving is not None and self._serving != version:
            self._version.local.remove(self._serving)
            self._version.exported.set(0, tags={"version": self._serving})
        self._serving = version
        self._version.labels(version).set(1)

    def text(self) -> tuple[bytes, str]:
        """This replica's series in the Prometheus text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def _counter(self, name: str) -> Metric:
        _, doc, labels = METRICS[name]
        return Metric(LocalCounter(name, doc, list(labels), registry=self.registry),
                      ray_metrics.Counter(name, doc, tag_keys=labels), labels)

    def _histogram(self, name: str) -> Metric:
        _, doc, labels = METRICS[name]
        return Metric(LocalHistogram(name, doc, list(labels), registry=self.registry, buckets=STAGE_BUCKETS),
                      ray_metrics.Histogram(name, doc, boundaries=list(STAGE_BUCKETS), tag_keys=labels), labels)


class BatchSizes:
    """``mgdspr_batch_size{stage}``: the size of each batch (``serve/batching.py``) of an encoder, a shard or a whole
    version (an ingress replica's with placement inline), into Ray's export only."""

    def __init__(self, stage: str) -> None:
        _, doc, labels = METRICS["mgdspr_batch_size"]
        self.tags = {"stage": stage}
        self.histogram = ray_metrics.Histogram("mgdspr_batch_size", doc, boundaries=list(BATCH_BUCKETS),
                                               tag_keys=labels)

    def observe(self, size: int) -> None:
        self.histogram.observe(size, tags=self.tags)
