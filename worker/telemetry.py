"""OpenTelemetry instruments of the runtime, exported over OTLP when configured.

Counters of received, committed, dead-lettered and nacked messages per topic;
histograms of batch size, commit latency and end-to-end lag (commit time minus
publish time); one span per batch. Without ``OTEL_EXPORTER_OTLP_ENDPOINT`` the
instruments still work (tests read them with an in-memory reader) but export nowhere.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

SERVICE_NAME = "utxoiq-persistence-worker"


@dataclass
class Telemetry:
    meter_provider: MeterProvider
    tracer_provider: TracerProvider

    def __post_init__(self) -> None:
        meter = self.meter_provider.get_meter("worker")
        self.tracer = self.tracer_provider.get_tracer("worker")
        self.received = meter.create_counter("worker.messages.received", unit="{message}")
        self.committed = meter.create_counter("worker.messages.committed", unit="{message}")
        self.dead_lettered = meter.create_counter("worker.messages.dead_lettered", unit="{message}")
        self.nacked = meter.create_counter("worker.messages.nacked", unit="{message}")
        # Exceptions no code path expected (bugs, inputs nobody foresaw), by stage.
        self.unexpected_errors = meter.create_counter("worker.unexpected_errors", unit="{error}")
        self.batch_size = meter.create_histogram("worker.batch.size", unit="{message}")
        self.commit_latency_ms = meter.create_histogram("worker.batch.commit_latency", unit="ms")
        # Per batch, the lag of its oldest message: an upper bound for all of them.
        self.lag_ms = meter.create_histogram("worker.batch.end_to_end_lag", unit="ms")

    def shutdown(self) -> None:
        self.meter_provider.shutdown()
        self.tracer_provider.shutdown()


def create_telemetry(extra_readers: Sequence[MetricReader] = ()) -> Telemetry:
    """Providers of our own (not the global ones), exporting over OTLP if configured."""
    resource = Resource.create({"service.name": SERVICE_NAME})
    readers: list[MetricReader] = list(extra_readers)
    tracer_provider = TracerProvider(resource=resource)
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    return Telemetry(meter_provider, tracer_provider)
