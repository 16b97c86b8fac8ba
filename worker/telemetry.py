"""OpenTelemetry instruments of the runtime, exported over OTLP when configured.

Counters of received, committed, dead-lettered (by reason) and nacked messages per
topic; histograms of batch size, commit latency and end-to-end lag (commit time minus
publish time), and of each stage of a message's way (``STAGES``); one span per batch,
linked to each publisher's trace that its messages carry
(``worker.pipeline.trace_links``). The read side counts cache hits and misses and times
each read; pool use and the age of the last good backup are gauges; maintenance runs
are counted by task and outcome. PostgreSQL, Redis and HTTP spans come from
OpenTelemetry's own instrumentation (``worker.instrumentation``) when exporting: the
runtime and the HTTP app turn it on.

Without ``OTEL_EXPORTER_OTLP_ENDPOINT`` the instruments still work (tests read them
with an in-memory reader) but export nowhere. ``OTEL_METRICS_EXPORTER=console`` (the
OpenTelemetry variable; other values are OTLP's business) also writes every export of
the metrics as one JSON line on standard output, the last at exit: what the latency
benchmark reads the stage histograms from, with no collector.
"""

from __future__ import annotations

import collections
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

SERVICE_NAME = "utxoiq-persistence-worker"

STAGES = ("delivery", "validate", "batch_wait", "commit", "invalidate", "ack")
"""A message's way through the worker, each stage timed (``worker.stage.duration``):
publish to receipt (pull or push), receipt to validated (a pull's messages queue
behind each other), validated to its batch's flush, the batch's transaction, the
invalidations published after it, and ack called to ack sent (pull: acks go in bulk).
Each is recorded once per batch (per ack request for ``ack``) for its slowest message,
so a message's time in a stage is at most what is recorded."""

STAGE_HISTOGRAM = "worker.stage.duration"

PoolReading = Callable[[], dict[str, int]]
"""Open connections of a pool by state (``checked_out``, ``idle``)."""


@dataclass
class Telemetry:
    meter_provider: MeterProvider
    tracer_provider: TracerProvider
    exporting: bool = False
    _pools: list[PoolReading] = field(default_factory=list)
    _last_backup_at: datetime | None = None

    def __post_init__(self) -> None:
        meter = self.meter_provider.get_meter("worker")
        self.tracer = self.tracer_provider.get_tracer("worker")
        self.received = meter.create_counter("worker.messages.received", unit="{message}")
        self.committed = meter.create_counter("worker.messages.committed", unit="{message}")
        # By topic and reason (CONTRACT.md's dead_letter_reason).
        self.dead_lettered = meter.create_counter("worker.messages.dead_lettered", unit="{message}")
        self.nacked = meter.create_counter("worker.messages.nacked", unit="{message}")
        # Exceptions no code path expected (bugs, inputs nobody foresaw), by stage.
        self.unexpected_errors = meter.create_counter("worker.unexpected_errors", unit="{error}")
        self.batch_size = meter.create_histogram("worker.batch.size", unit="{message}")
        self.commit_latency_ms = meter.create_histogram("worker.batch.commit_latency", unit="ms")
        # Per batch, the lag of its oldest message: an upper bound for all of them.
        self.lag_ms = meter.create_histogram("worker.batch.end_to_end_lag", unit="ms")
        # By topic and stage (STAGES): where a slow message spent its time.
        self.stage_ms = meter.create_histogram(STAGE_HISTOGRAM, unit="ms")
        # The read path, by cache (the key's first part: feedback, backfill, metrics):
        # hit or miss, and the read's whole time (a miss includes its query and fill).
        # Counted here and observed at each collection, not an SDK Counter: a cache hit
        # costs tens of µs in all, and Counter.add several of them (README, the cache).
        self._cache_lookups: collections.Counter[tuple[str, str]] = collections.Counter()
        meter.create_observable_counter(
            "cache.lookups", callbacks=[self._observe_cache_lookups], unit="{lookup}"
        )
        self.read_duration_ms = meter.create_histogram("read.duration", unit="ms")
        # By task and outcome (succeeded, failed, done elsewhere).
        self.maintenance_runs = meter.create_counter("maintenance.runs", unit="{run}")
        meter.create_observable_gauge(
            "db.pool.connections", callbacks=[self._observe_pools], unit="{connection}"
        )
        meter.create_observable_gauge(
            "backup.last_success_age", callbacks=[self._observe_backup_age], unit="s"
        )

    def count_cache_lookup(self, cache: str, hit: bool) -> None:
        """One read of ``cache`` (``cache.lookups``, by cache and result)."""
        self._cache_lookups[cache, "hit" if hit else "miss"] += 1

    def _observe_cache_lookups(self, _: CallbackOptions) -> Iterable[Observation]:
        for (cache, result), count in list(self._cache_lookups.items()):
            yield Observation(count, {"cache": cache, "result": result})

    def observe_pool(self, reading: PoolReading) -> None:
        """Report a pool's connections by state (``db.pool.connections``)."""
        self._pools.append(reading)

    def backup_succeeded(self, finished_at: datetime) -> None:
        """A backup run is known to have succeeded at ``finished_at`` (here or by
        another process): ``backup.last_success_age`` counts from the latest one."""
        if self._last_backup_at is None or finished_at > self._last_backup_at:
            self._last_backup_at = finished_at

    def _observe_pools(self, _: CallbackOptions) -> Iterable[Observation]:
        for reading in self._pools:
            for state, count in reading().items():
                yield Observation(count, {"state": state})

    def _observe_backup_age(self, _: CallbackOptions) -> Iterable[Observation]:
        # Nothing until this process saw a backup settle: an unknown age is not zero.
        if self._last_backup_at is not None:
            yield Observation((datetime.now(UTC) - self._last_backup_at).total_seconds())

    def shutdown(self) -> None:
        self.meter_provider.shutdown()
        self.tracer_provider.shutdown()


_EXPONENTIAL = ExponentialBucketHistogramAggregation(max_size=320)


def create_telemetry(extra_readers: Sequence[MetricReader] = ()) -> Telemetry:
    """Providers of our own (not the global ones), exporting over OTLP if configured."""
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", SERVICE_NAME)})
    readers: list[MetricReader] = list(extra_readers)
    tracer_provider = TracerProvider(resource=resource)
    exporting = bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    if exporting:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if "console" in os.environ.get("OTEL_METRICS_EXPORTER", "").split(","):
        console = ConsoleMetricExporter(out=sys.stdout, formatter=_one_line)
        readers.append(PeriodicExportingMetricReader(console))
    meter_provider = MeterProvider(
        resource=resource,
        metric_readers=readers,
        # Stage times span microseconds (validation) to seconds (a slow commit): an
        # exponential histogram keeps every quantile within a bucket's width (under 5%
        # with 320 buckets over up to 20 doublings), where the default buckets (0, 5,
        # 10, 25, 50, 75 ... ms) cannot tell 55 ms from 70.
        views=[View(instrument_name=STAGE_HISTOGRAM, aggregation=_EXPONENTIAL)],
    )
    return Telemetry(meter_provider, tracer_provider, exporting)


def _one_line(data: MetricsData) -> str:
    return data.to_json(indent=None) + "\n"
