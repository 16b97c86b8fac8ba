"""Helpers for tests that go through the Pub/Sub emulator: publish, read dead letters,
poll for an outcome, run a worker in-process.

The fixtures that use them (``pubsub_settings``, ``pubsub``) are in ``tests/conftest.py``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from opentelemetry.sdk.metrics.export import InMemoryMetricReader, Sum
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.topics import INGEST_TOPICS, REGISTRY
from worker.config import Settings
from worker.pipeline.settings import BatchSettings
from worker.pubsub.client import PubSub, PubsubMessage
from worker.pubsub.names import dead_letter_subscription
from worker.runtime import Runtime
from worker.sources.pull_worker import PullWorker
from worker.sources.settings import PullSettings
from worker.telemetry import Telemetry, create_telemetry
from worker.topics import Registry

T = TypeVar("T")

# Short batch delays: tests wait for outcomes, not for batches to fill.
FAST_BATCH = BatchSettings(max_batch_size=1000, max_batch_delay_ms=10)
PUBLISH_CHUNK = 1000
PUBLISH_CHUNK_BYTES = 8 * 1024 * 1024

Payload = bytes | Mapping[str, Any]


@dataclass(frozen=True)
class Outgoing:
    """A message to publish: data (JSON-encoded unless bytes) and attributes."""

    data: bytes
    attributes: Mapping[str, str] = field(default_factory=dict)


def encode(payload: Payload) -> bytes:
    if isinstance(payload, bytes):
        return payload
    return json.dumps(payload).encode("utf-8")


def message(payload: Payload, **attributes: str) -> Outgoing:
    return Outgoing(encode(payload), attributes)


@dataclass(frozen=True)
class Received:
    """A message as read back from a subscription."""

    data: bytes
    attributes: dict[str, str]
    message_id: str
    publish_time: datetime


@dataclass(frozen=True)
class Published:
    data: bytes
    attributes: dict[str, str]
    message_id: str


async def publish(
    pubsub: PubSub,
    topic: str,
    messages: Iterable[Payload | Outgoing],
    *,
    attributes: Mapping[str, str] | None = None,
) -> list[Published]:
    """Publish in the order given (requests of up to 1000); what was published, with ids.

    ``attributes`` are added to every message that does not set them itself.
    """
    outgoing = [m if isinstance(m, Outgoing) else Outgoing(encode(m)) for m in messages]
    chunks: list[list[Outgoing]] = [[]]
    size = 0
    for item in outgoing:
        if chunks[-1] and (
            len(chunks[-1]) >= PUBLISH_CHUNK or size + len(item.data) > PUBLISH_CHUNK_BYTES
        ):
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += len(item.data)
    published: list[Published] = []
    target = pubsub.topic(topic)
    for chunk in chunks:
        if not chunk:
            continue
        protos = [
            PubsubMessage(data=m.data, attributes={**(attributes or {}), **m.attributes})
            for m in chunk
        ]
        ids = await pubsub.publish(target, protos, timeout_s=60)
        assert len(ids) == len(chunk)
        published.extend(
            Published(p.data, dict(p.attributes), mid) for p, mid in zip(protos, ids, strict=True)
        )
    return published


def _publish_time(message: Any) -> datetime:
    stamp = message.publish_time
    return datetime.fromtimestamp(stamp.seconds + stamp.nanos / 1e9, UTC)


QUIET_S = 0.3
"""How long a subscription must stay empty once the messages expected came. What the
worker publishes with them (a dead letter and its neighbours) is published before the
message is acknowledged, so anything extra is there by then: a longer quiet only
waits for redeliveries, which come after an ack deadline (10 s), never within it."""


async def pull_all(
    pubsub: PubSub,
    subscription: str,
    *,
    expected: int = 0,
    timeout_s: float = 30.0,
    quiet_s: float = QUIET_S,
) -> list[Received]:
    """Pull and ack until ``expected`` messages came, then until ``quiet_s`` brings none.

    Returns every message read (so more than ``expected`` when more arrive: the caller
    asserts). Gives up after ``timeout_s`` with what it has.
    """
    path = pubsub.subscription(subscription)
    received: list[Received] = []
    deadline = time.monotonic() + timeout_s
    quiet_until: float | None = None
    while time.monotonic() < deadline:
        wait_s = 1.0
        if len(received) >= expected:
            if quiet_until is None:
                quiet_until = time.monotonic() + quiet_s
            elif time.monotonic() >= quiet_until:
                break
            # A pull waits for messages until its deadline: no longer than the quiet.
            wait_s = max(0.05, quiet_until - time.monotonic())
        batch = await pubsub.pull(path, 1000, timeout_s=wait_s)
        if batch:
            await pubsub.acknowledge(path, [m.ack_id for m in batch])
            quiet_until = None
        received.extend(
            Received(
                m.message.data,
                dict(m.message.attributes),
                m.message.message_id,
                _publish_time(m.message),
            )
            for m in batch
        )
        if not batch:
            await asyncio.sleep(0.05)
    return received


async def drain_dead_letters(
    pubsub: PubSub, topic: str, *, expected: int = 0, timeout_s: float = 30.0, quiet_s: float = 1.0
) -> list[Received]:
    """Every dead letter of ``topic`` (read through ``{topic}-dead-letter-sub``, acked)."""
    return await pull_all(
        pubsub,
        dead_letter_subscription(topic),
        expected=expected,
        timeout_s=timeout_s,
        quiet_s=quiet_s,
    )


async def wait_for(
    probe: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    *,
    timeout_s: float = 30.0,
    interval_s: float = 0.05,
    what: str = "condition",
) -> T:
    """Call ``probe`` until ``done`` holds for its value; that value. Fails on timeout:
    only on a probe that began after the deadline, so that the failing value is the
    state at the deadline, not one read before a stall of this process (a cold disk,
    a paused machine) that outlasted it."""
    deadline = time.monotonic() + timeout_s
    while True:
        began = time.monotonic()
        value = await probe()
        if done(value):
            return value
        if began >= deadline:
            raise AssertionError(f"{what} not reached within {timeout_s}s; last value: {value!r}")
        await asyncio.sleep(min(interval_s, max(0.0, deadline - time.monotonic())))


def json_log_entries(lines: Sequence[str]) -> list[dict[str, Any]]:
    """Every stderr line that is a JSON object (all of the worker's own lines are)."""
    entries = []
    for line in lines:
        if line.startswith("{"):
            entry = json.loads(line)
            assert isinstance(entry, dict)
            entries.append(entry)
    return entries


async def scalar(engine: AsyncEngine, sql: str, **params: Any) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(text(sql), params)).scalar_one()


async def wait_for_count(
    engine: AsyncEngine, sql: str, expected: int, *, timeout_s: float = 30.0
) -> int:
    """Poll ``sql`` (a count) until it reaches ``expected``; fails on timeout."""

    async def probe() -> int:
        return int(await scalar(engine, sql))

    return await wait_for(
        probe, lambda n: n >= expected, timeout_s=timeout_s, what=f"{sql!r} >= {expected}"
    )


@asynccontextmanager
async def running_worker(
    settings: Settings,
    *,
    topics: Sequence[str] = INGEST_TOPICS,
    batch: BatchSettings = FAST_BATCH,
    pull: PullSettings | None = None,
    telemetry: Telemetry | None = None,
    registry: Registry = REGISTRY,
) -> AsyncIterator[PullWorker]:
    """A pull worker on a runtime of its own, started in-process, stopped on exit."""
    runtime = Runtime(settings, registry, telemetry=telemetry, batch=batch)
    worker = PullWorker(runtime, topics, pull)
    try:
        await worker.start()
        yield worker
    finally:
        await worker.stop()
        await runtime.close()


class Counters:
    """The worker's message counters, read through an in-memory reader."""

    NAMES = ("received", "committed", "dead_lettered", "nacked")

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.telemetry = create_telemetry(extra_readers=[self.reader])

    def totals(self) -> dict[str, dict[str, int]]:
        """``{"committed": {"feedback": 3, ...}, ...}`` (cumulative since start)."""
        totals: dict[str, dict[str, int]] = {name: {} for name in self.NAMES}
        data = self.reader.get_metrics_data()
        if data is None:
            return totals
        for resource_metrics in data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    name = metric.name.removeprefix("worker.messages.")
                    if name not in totals or not isinstance(metric.data, Sum):
                        continue
                    for point in metric.data.data_points:
                        topic = str((point.attributes or {})["topic"])
                        totals[name][topic] = totals[name].get(topic, 0) + int(point.value)
        return totals

    async def wait_settled(
        self, expected: Mapping[str, int], *, timeout_s: float = 30.0
    ) -> dict[str, dict[str, int]]:
        """Wait until committed + dead-lettered reach ``expected`` (per topic)."""

        def settled(totals: dict[str, dict[str, int]]) -> bool:
            return all(
                totals["committed"].get(topic, 0) + totals["dead_lettered"].get(topic, 0) >= n
                for topic, n in expected.items()
            )

        return await wait_for(
            self.read, settled, timeout_s=timeout_s, what=f"settled messages {dict(expected)}"
        )

    async def read(self) -> dict[str, dict[str, int]]:
        """``totals``, as a probe for ``wait_for``."""
        return self.totals()
