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
        self.requests = self._counter("mgdspr_requests", "HTTP requests by endpoint and status code",
                                      ("endpoint", "code"))
        self.stage_seconds = self._histogram("mgdspr_stage_seconds", "latency of each stage of /v1/retrieve",
                                             ("stage",))
        self.filtered = self._counter("mgdspr_filtered_items", "hits removed by the relevance filter")
        self.fallbacks = self._counter("mgdspr_fallback_pages", "responses the lexical fallback filled because the "
                                       "filter left fewer than k embedding hits")
        self.relaxed = self._counter("mgdspr_relaxed_pages", "responses filled with the query's product type "
                                     "because too few items have every key term")
        self.retries = self._counter("mgdspr_retried_calls", "reads retried on another replica after theirs died "
                                     "or was unavailable, by stage", ("stage",))
        self._version = Metric(LocalGauge("mgdspr_serving_version", "1 for the version this replica serves",
                                          ["version"], registry=self.registry),
                               ray_metrics.Gauge("mgdspr_serving_version", "1 for the version this replica serves",
                                                 tag_keys=("version",)), ("version",))
        self._serving: str | None = None

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

    def _counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Metric:
        return Metric(LocalCounter(name, doc, list(labels), registry=self.registry),
                      ray_metrics.Counter(name, doc, tag_keys=labels), labels)

    def _histogram(self, name: str, doc: str, labels: tuple[str, ...]) -> Metric:
        return Metric(LocalHistogram(name, doc, list(labels), registry=self.registry, buckets=STAGE_BUCKETS),
                      ray_metrics.Histogram(name, doc, boundaries=list(STAGE_BUCKETS), tag_keys=labels), labels)
