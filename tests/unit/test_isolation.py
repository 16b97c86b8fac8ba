"""One bad message never costs its neighbours (issue 14): an unexpected exception
while validating, applying or pulling nacks the message it belongs to, alone; the
loops that died of one start again and release what they held.

The pipeline and the pull source are the real ones; the handler and Pub/Sub are
fakes that fail on purpose.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint

from tests.unit.test_leases import FakePipeline, Received
from worker.exceptions import PermanentError, SchemaViolationError
from worker.pipeline.batching import BatchSettings, TopicPipeline
from worker.pipeline.delivery import Delivery
from worker.pipeline.handler import BatchOutcome
from worker.sources.pull import PullSettings, PullSource
from worker.telemetry import create_telemetry


class Fussy:
    """A handler whose ``parse`` and ``apply`` fail unexpectedly on chosen payloads."""

    topic = "feedback"

    def __init__(self) -> None:
        self.applied: list[bytes] = []

    def parse(self, payload: dict[str, Any], published_at: datetime) -> bytes:
        if payload.get("parse") == "boom":
            raise RecursionError("maximum recursion depth exceeded")
        if payload.get("parse") == "refuse":
            raise SchemaViolationError("parse: refused")
        return str(payload.get("id")).encode()

    async def apply(self, engine: Any, items: Sequence[bytes]) -> BatchOutcome:
        await asyncio.sleep(0)
        if b"apply-boom" in items:
            raise OverflowError("date value out of range")
        self.applied.extend(items)
        return BatchOutcome()


class Settled:
    """Records each delivery's fate."""

    def __init__(self) -> None:
        self.acked: list[str] = []
        self.nacked: list[str] = []

    def ack(self, delivery: Delivery) -> None:
        self.acked.append(delivery.message_id)

    def nack(self, delivery: Delivery) -> None:
        self.nacked.append(delivery.message_id)


class DeadLetters:
    def __init__(self) -> None:
        self.published: list[tuple[str, str]] = []

    async def publish(self, topic: str, entries: Sequence[tuple[Delivery, PermanentError]]) -> None:
        self.published.extend((d.message_id, e.reason) for d, e in entries)


def delivery(settled: Settled, message_id: str, data: bytes) -> Delivery:
    return Delivery(data, {}, message_id, datetime.now(UTC), "s", settled)


def unexpected_errors(reader: InMemoryMetricReader) -> dict[str, int]:
    counts: dict[str, int] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == "worker.unexpected_errors":
                    for point in metric.data.data_points:
                        assert isinstance(point, NumberDataPoint)
                        stage = str((point.attributes or {})["stage"])
                        counts[stage] = counts.get(stage, 0) + int(point.value)
    return counts


async def test_unexpected_errors_nack_their_message_alone() -> None:
    handler, settled, dead = Fussy(), Settled(), DeadLetters()
    reader = InMemoryMetricReader()
    pipeline = TopicPipeline(
        handler,
        engine=None,  # type: ignore[arg-type]
        dead_letters=dead,  # type: ignore[arg-type]
        telemetry=create_telemetry(extra_readers=[reader]),
        settings=BatchSettings(max_batch_delay_ms=20, flush_when_idle=False),
    )
    runner = asyncio.create_task(pipeline.run())
    messages = {f"ok-{i}": b'{"id": "ok-%d"}' % i for i in range(20)}
    messages["parse-boom"] = b'{"parse": "boom"}'
    messages["apply-boom"] = b'{"id": "apply-boom"}'
    messages["refused"] = b'{"parse": "refuse"}'
    for message_id, data in messages.items():
        pipeline.submit(delivery(settled, message_id, data))
    for _ in range(200):
        if len(settled.acked) + len(settled.nacked) == len(messages):
            break
        await asyncio.sleep(0.01)
    runner.cancel()

    assert sorted(settled.nacked) == ["apply-boom", "parse-boom"]
    assert sorted(settled.acked) == sorted([*(f"ok-{i}" for i in range(20)), "refused"])
    assert sorted(handler.applied) == sorted(f"ok-{i}".encode() for i in range(20))
    assert dead.published == [("refused", "schema_violation")]
    assert unexpected_errors(reader) == {"validate": 1, "apply": 1}


class FlakyPipeline(FakePipeline):
    """Its ``submit`` raises once, on the second message it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.errors: list[str] = []

    def submit(self, delivery: Any) -> None:
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("a bug in the intake")
        super().submit(delivery)

    def count_unexpected(self, stage: str) -> None:
        self.errors.append(stage)


class Backlog:
    """Three messages a pull, for ever; records acks and nacks."""

    def __init__(self) -> None:
        self.served = 0
        self.nacked: list[str] = []

    def subscription(self, name: str) -> str:
        return name

    async def pull(self, subscription: str, count: int, timeout_s: float) -> list[Received]:
        await asyncio.sleep(0.01)
        first, self.served = self.served, self.served + 3
        return [Received(n) for n in range(first, self.served)]

    async def modify_ack_deadline(self, subscription: str, ack_ids: Sequence[str], s: int) -> None:
        if s == 0:
            self.nacked.extend(ack_ids)

    async def acknowledge(self, subscription: str, ack_ids: Sequence[str]) -> None:
        return None


async def test_a_pull_loop_that_raises_releases_its_messages_and_goes_on() -> None:
    backlog, pipeline = Backlog(), FlakyPipeline()
    settings = PullSettings(pullers=1, max_outstanding_messages=100, settle_every_ms=5)
    source = PullSource(backlog, "sub", pipeline, settings)  # type: ignore[arg-type]
    source.start()
    try:
        for _ in range(300):
            if len(pipeline.submitted) >= 10:
                break
            await asyncio.sleep(0.01)
    finally:
        await source.stop_pulling()
        await source.close()
    # The failing message and the one after it in its pull went back to Pub/Sub at
    # once; the loop restarted and went on pulling.
    assert backlog.nacked[:2] == ["ack-1", "ack-2"]
    assert len(pipeline.submitted) >= 10
    assert pipeline.errors == ["pull"]
