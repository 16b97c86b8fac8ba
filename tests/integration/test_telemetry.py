"""Telemetry against the real stack: a batch span linked to its publishers' traces,
with PostgreSQL's spans (OpenTelemetry's asyncpg instrumentation) inside it; dead
letters counted by reason; each stage of a message's way timed; the read path's hits,
misses and durations; pool use; the read API's server spans (OpenTelemetry's FastAPI
instrumentation), probes left out."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    ExponentialHistogramDataPoint,
    InMemoryMetricReader,
    Sum,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tests.support.cache import own_redis_db
from tests.support.emulator import message, publish, running_worker, wait_for
from tests.support.factories import feedback_payload
from tests.support.topics import REGISTRY
from worker.config import Settings
from worker.http.app import create_app
from worker.http.services import Services
from worker.instrumentation import instrument_clients, uninstrument_clients
from worker.pipeline.settings import BatchSettings
from worker.pubsub.client import PubSub
from worker.telemetry import STAGE_HISTOGRAM, STAGES, Telemetry, create_telemetry

TRACE, SPAN = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"


class Recorded:
    def __init__(self) -> None:
        self.metrics = InMemoryMetricReader()
        self.spans = InMemorySpanExporter()
        self.telemetry: Telemetry = create_telemetry(extra_readers=[self.metrics])
        self.telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))

    def points(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        """Every data point of ``name``: its attributes and the point."""
        found = []
        data = self.metrics.get_metrics_data()
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == name:
                        found += [(dict(p.attributes or {}), p) for p in metric.data.data_points]
        return found

    def finished(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if s.name == name]


@pytest.fixture
def recorded() -> Iterator[Recorded]:
    found = Recorded()
    instrument_clients(found.telemetry)
    try:
        yield found
    finally:
        uninstrument_clients()


async def test_a_batch_links_its_publishers_traces_and_holds_its_queries(
    pubsub_settings: Settings, pubsub: PubSub, recorded: Recorded
) -> None:
    traced = message(feedback_payload(user_id="u1"), traceparent=f"00-{TRACE}-{SPAN}-01")
    poison = message(b"{not json")
    async with running_worker(pubsub_settings, topics=("feedback",), telemetry=recorded.telemetry):
        await publish(pubsub, "feedback", [traced, poison])

        async def dead_lettered() -> dict[str, int]:
            points = recorded.points("worker.messages.dead_lettered")
            return {attributes["reason"]: int(point.value) for attributes, point in points}

        await wait_for(
            dead_lettered, lambda found: found == {"invalid_json": 1}, what="a dead letter"
        )
        await wait_for(
            probe_spans(recorded), lambda spans: any(s.links for s in spans), what="a linked span"
        )

    [batch] = [s for s in recorded.finished("batch feedback") if s.links]
    linked = [(f"{k.context.trace_id:032x}", f"{k.context.span_id:016x}") for k in batch.links]
    assert linked == [(TRACE, SPAN)]
    assert batch.context is not None
    queries = [
        s
        for s in recorded.spans.get_finished_spans()
        if s.instrumentation_scope is not None
        and "asyncpg" in s.instrumentation_scope.name
        and s.context is not None
        and s.context.trace_id == batch.context.trace_id
    ]
    assert queries, "no PostgreSQL span inside the batch's trace"


def probe_spans(recorded: Recorded) -> Any:
    async def probe() -> list[ReadableSpan]:
        return recorded.finished("batch feedback")

    return probe


async def test_each_stage_of_a_message_is_timed_for_the_slowest_of_its_batch(
    pubsub_settings: Settings, pubsub: PubSub, recorded: Recorded
) -> None:
    # No flush while idle: the batch waits out its 300 ms delay, a wait the batching
    # stage must show (and no other stage).
    held = BatchSettings(max_batch_size=1000, max_batch_delay_ms=300, flush_when_idle=False)
    async with running_worker(
        pubsub_settings, topics=("feedback",), telemetry=recorded.telemetry, batch=held
    ):
        payloads = [feedback_payload(user_id=f"u{i}") for i in range(20)]
        await publish(pubsub, "feedback", payloads)

        async def timed() -> dict[str, ExponentialHistogramDataPoint]:
            return {a["stage"]: p for a, p in recorded.points(STAGE_HISTOGRAM)}

        await wait_for(timed, lambda found: set(found) == set(STAGES), what="every stage timed")
    stages = await timed()
    assert all(isinstance(p, ExponentialHistogramDataPoint) for p in stages.values())
    assert 250 <= stages["batch_wait"].max < 5000, stages["batch_wait"]
    for name in ("validate", "commit", "invalidate", "ack"):
        assert 0 < stages[name].max < 250, (name, stages[name])
    assert stages["delivery"].min >= 0 and stages["delivery"].max < 5000, stages["delivery"]
    attributes = {tuple(sorted(a.items())) for a, _ in recorded.points(STAGE_HISTOGRAM)}
    assert attributes == {(("stage", s), ("topic", "feedback")) for s in STAGES}


async def test_reads_count_hits_and_misses_and_the_pool_is_observed(
    pubsub_settings: Settings, recorded: Recorded
) -> None:
    recorded.telemetry.exporting = True  # the reads' own spans are made only then
    async with own_redis_db(pubsub_settings) as rdb:
        services = Services.create(rdb.settings, REGISTRY, telemetry=recorded.telemetry)
        try:
            insight = f"insight-{uuid.uuid4().hex[:8]}"
            await services.reads.get_feedback_stats(insight)  # a miss, then a fill
            await services.reads.get_feedback_stats(insight)  # a hit
        finally:
            await services.close()

    lookups = {a["result"]: int(p.value) for a, p in recorded.points("cache.lookups")}
    assert lookups == {"miss": 1, "hit": 1}
    # Counted by the cache and observed at collection: still a monotonic sum, as a
    # Counter's, for whoever reads the export.
    [lookup_metric] = [
        m
        for rm in recorded.metrics.get_metrics_data().resource_metrics  # type: ignore[union-attr]
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "cache.lookups"
    ]
    assert isinstance(lookup_metric.data, Sum) and lookup_metric.data.is_monotonic
    assert lookup_metric.data.aggregation_temporality == AggregationTemporality.CUMULATIVE
    assert {a["cache"] for a, _ in recorded.points("cache.lookups")} == {"feedback"}
    [(attributes, durations)] = recorded.points("read.duration")
    assert attributes == {"cache": "feedback"} and durations.count == 2
    states = {a["state"] for a, _ in recorded.points("db.pool.connections")}
    assert states == {"checked_out", "idle"}
    redis_spans = [
        s
        for s in recorded.spans.get_finished_spans()
        if (s.attributes or {}).get("db.system") == "redis" and s.kind == SpanKind.CLIENT
    ]
    # Two reads on the shared connection (worker.storage.redis_multiplexed), the fill
    # through redis-py (its instrumentation's span).
    assert [s.name for s in redis_spans].count("MGET") == 2, redis_spans
    assert any(s.name != "MGET" for s in redis_spans), redis_spans


async def test_read_requests_make_server_spans_and_probes_none(
    pubsub_settings: Settings, recorded: Recorded
) -> None:
    recorded.telemetry.exporting = True  # as with OTEL_EXPORTER_OTLP_ENDPOINT set
    async with own_redis_db(pubsub_settings) as rdb:
        services = Services.create(rdb.settings, REGISTRY, telemetry=recorded.telemetry)
        app = create_app(services, None, recorded.telemetry)
        try:
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://w") as client:
                    assert (await client.get("/v1/feedback/insight-1/stats")).status_code == 200
                    assert (await client.get("/v1/backfill-jobs")).status_code == 200
                    assert (await client.get("/healthz")).status_code == 200
        finally:
            await services.close()

    # The stats read is served outside FastAPI's stack (worker.http.stats_read), the job
    # list inside it: both make the same kind of span and metric.
    server_spans = [s for s in recorded.spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    routes = {s.name: (s.attributes or {}).get("http.route") for s in server_spans}
    assert routes == {
        "GET /v1/feedback/{insight_id}/stats": "/v1/feedback/{insight_id}/stats",
        "GET /v1/backfill-jobs": "/v1/backfill-jobs",
    }
    timed = {a.get("http.target") for a, _ in recorded.points("http.server.duration")}
    assert timed == {"/v1/feedback/{insight_id}/stats", "/v1/backfill-jobs"}
