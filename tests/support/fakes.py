"""Fakes of the pipeline's collaborators, for unit tests of its decisions: a handler
that fails on purpose, a settler and a dead-letter publisher that record."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint

from worker.exceptions import PermanentError, SchemaViolationError, WorkerError
from worker.pipeline.batching import AfterCommit, Backoff, TopicPipeline
from worker.pipeline.delivery import Delivery
from worker.pipeline.handler import BatchOutcome
from worker.pipeline.settings import BatchSettings
from worker.telemetry import create_telemetry


class Fussy:
    """A handler whose ``parse`` and ``apply`` fail unexpectedly on chosen payloads."""

    topic = "feedback"

    def __init__(self, transient_failures: int = 0) -> None:
        self.applied: list[bytes] = []
        self.calls = 0
        self.transient_failures = transient_failures

    def parse(self, payload: dict[str, Any], published_at: datetime) -> bytes:
        if payload.get("parse") == "boom":
            raise RecursionError("maximum recursion depth exceeded")
        if payload.get("parse") == "refuse":
            raise SchemaViolationError("parse: refused")
        return str(payload.get("id")).encode()

    async def apply(self, engine: Any, items: Sequence[bytes]) -> BatchOutcome:
        await asyncio.sleep(0)
        self.calls += 1
        if b"apply-boom" in items:
            raise OverflowError("date value out of range")
        if b"apply-refuse" in items:
            raise SchemaViolationError("apply: refused by the database")
        if self.transient_failures:
            self.transient_failures -= 1
            raise TransientError("database unavailable")
        self.applied.extend(items)
        return BatchOutcome(cache_keys=frozenset(f"key:{i.decode()}" for i in items))


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
    """Records what it publishes; ``failing`` makes every publish fail (transient)."""

    def __init__(self, failing: bool = False) -> None:
        self.published: list[tuple[str, str]] = []
        self.failing = failing

    async def publish(self, topic: str, entries: Sequence[tuple[Delivery, PermanentError]]) -> None:
        if self.failing:
            raise TransientError("dead-letter topic unavailable")
        self.published.extend((d.message_id, e.reason) for d, e in entries)


class TransientError(WorkerError):
    transient = True


def delivery(settled: Settled, message_id: str, data: bytes) -> Delivery:
    return Delivery(data, {}, message_id, datetime.now(UTC), "s", settled)


def counter(reader: InMemoryMetricReader, name: str, label: str = "topic") -> dict[str, int]:
    """A counter's points summed by one of their attributes."""
    counts: dict[str, int] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == name:
                    for point in metric.data.data_points:
                        assert isinstance(point, NumberDataPoint)
                        key = str((point.attributes or {})[label])
                        counts[key] = counts.get(key, 0) + int(point.value)
    return counts


class PipelineRun:
    """A real ``TopicPipeline`` over the fakes: submit messages, wait for their fates.

    ``settings`` default to a short delay and no flush when idle, so that what is
    submitted at once is one batch.
    """

    def __init__(
        self,
        handler: Fussy,
        dead: DeadLetters | None = None,
        after_commit: AfterCommit | None = None,
        settings: BatchSettings = BatchSettings(max_batch_delay_ms=20, flush_when_idle=False),
    ) -> None:
        self.handler, self.settled, self.dead = handler, Settled(), dead or DeadLetters()
        self.reader = InMemoryMetricReader()
        self.pipeline = TopicPipeline(
            handler,
            engine=None,  # type: ignore[arg-type]
            dead_letters=self.dead,  # type: ignore[arg-type]
            telemetry=create_telemetry(extra_readers=[self.reader]),
            settings=settings,
            after_commit=after_commit,
            backoff=Backoff(initial_s=0.05, maximum_s=0.2),
        )

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The pipeline's flush loop, running for the block."""
        runner = asyncio.create_task(self.pipeline.run())
        try:
            yield
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    def submit(self, message_id: str, data: bytes) -> None:
        self.pipeline.submit(delivery(self.settled, message_id, data))

    async def wait_until(self, condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
        """Return once ``condition`` holds (the pipeline task decides when)."""
        async with asyncio.timeout(timeout_s):
            while not condition():  # noqa: ASYNC110 - fates come from the pipeline task
                await asyncio.sleep(0.005)

    async def settle(self, messages: dict[str, bytes], timeout_s: float = 5.0) -> None:
        """Submit ``messages`` (id -> data) and wait until each was acked or nacked."""
        settled = self.settled
        async with self.running():
            for message_id, data in messages.items():
                self.submit(message_id, data)
            await self.wait_until(
                lambda: len(settled.acked) + len(settled.nacked) >= len(messages), timeout_s
            )


def payloads(*ids: str) -> dict[str, bytes]:
    """Messages whose id and payload ``id`` are the same."""
    return {i: b'{"id": "%s"}' % i.encode() for i in ids}
