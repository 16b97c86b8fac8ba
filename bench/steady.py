"""A steady offer of one-sample metrics messages, and when each is committed.

Shared by the ``latency`` and ``retention`` scenarios. A message's latency runs from
the publisher's clock just before its publish call to the moment the benchmark sees
its row committed (``system_metric_ids``, polled every 5 ms for the ids not yet seen).
``pull_floor_ms`` measures the same offer against a bare pull-and-ack loop instead of
the worker: what Pub/Sub's delivery alone costs, the floor under the worker's figure.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime

import asyncpg

from worker.pubsub.client import PubSub, PubsubMessage

TICK_S = 0.01
POLL_S = 0.005

Stamps = dict[uuid.UUID, float]
"""Message id -> ``time.monotonic()`` of its publish, or of its commit (or receipt)."""


def payload(event_id: uuid.UUID, n: int, now: datetime) -> bytes:
    sample = {
        "event_id": str(event_id),
        "service_name": f"svc-{n % 16}",
        "metric_type": ("cpu", "memory", "latency", "requests")[n % 4],
        "metric_value": (n % 1000) / 10,
        "unit": ("percent", "megabytes", "milliseconds", "per_second")[n % 4],
        "timestamp": now.isoformat(),
        "metadata": {"host": f"node-{n % 64}", "region": "us-central1", "pod": f"p-{n % 997}"},
    }
    return json.dumps(sample).encode()


def offered(rate_per_s: int, duration_s: float) -> int:
    return int(rate_per_s * TICK_S) * int(duration_s / TICK_S)


async def offer(
    pubsub: PubSub, rate_per_s: int, duration_s: float, sent: Stamps, pending: set[uuid.UUID]
) -> None:
    """Publish ``rate_per_s`` messages a second, ``TICK_S`` apart, for ``duration_s``;
    each id goes into ``sent`` (with its stamp) and ``pending`` before its publish."""
    target, per_tick, start = pubsub.topic("metrics"), int(rate_per_s * TICK_S), time.monotonic()
    for tick in range(int(duration_s / TICK_S)):
        delay = start + tick * TICK_S - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        ids, now = [uuid.uuid4() for _ in range(per_tick)], datetime.now(UTC)
        messages = [
            PubsubMessage(data=payload(i, tick * per_tick + n, now)) for n, i in enumerate(ids)
        ]
        stamp = time.monotonic()
        sent.update(dict.fromkeys(ids, stamp))
        pending.update(ids)
        await pubsub.publish(target, messages)


async def _watch_commits(dsn: str, pending: set[uuid.UUID], seen: Stamps, total: int) -> None:
    """Note when each pending id is committed, until ``total`` are or a minute after
    the offer. Only the pending ids are asked for: a scan of every id sent would grow
    to 30k lookups a poll, CPU taken from the worker being measured."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + total / 100 + 60
        while len(seen) < total and time.monotonic() < deadline:
            if pending:
                found = await conn.fetch(
                    "SELECT id FROM system_metric_ids WHERE id = ANY($1::uuid[])", list(pending)
                )
                stamp = time.monotonic()
                for record in found:
                    seen[record["id"]] = stamp
                    pending.discard(record["id"])
            await asyncio.sleep(POLL_S)
    finally:
        await conn.close()


async def latencies_ms(pubsub: PubSub, dsn: str, rate_per_s: int, duration_s: float) -> list[float]:
    """Publish-to-commit latencies (sorted) of ``duration_s`` of the steady offer to a
    running worker. Fails unless every message was committed."""
    sent: Stamps = {}
    seen: Stamps = {}
    pending: set[uuid.UUID] = set()
    total = offered(rate_per_s, duration_s)
    await asyncio.gather(
        offer(pubsub, rate_per_s, duration_s, sent, pending),
        _watch_commits(dsn, pending, seen, total),
    )
    if len(seen) < total:
        raise RuntimeError(f"only {len(seen)} of {total} messages were committed")
    return sorted((seen[i] - sent[i]) * 1000 for i in sent)


async def pull_floor_ms(
    pubsub: PubSub, subscription: str, rate_per_s: int, duration_s: float, pullers: int
) -> list[float]:
    """Publish-to-receipt latencies (sorted) of the same offer, pulled by ``pullers``
    bare long-polling pull-and-ack loops (the worker's pull calls, nothing else)."""
    sent: Stamps = {}
    seen: Stamps = {}
    pending: set[uuid.UUID] = set()
    total = offered(rate_per_s, duration_s)
    path = pubsub.subscription(subscription)
    done = asyncio.Event()

    async def pull_loop() -> None:
        while not done.is_set():
            received = await pubsub.pull(path, 1000, 2.0)
            stamp = time.monotonic()
            for message in received:
                seen[uuid.UUID(json.loads(message.message.data)["event_id"])] = stamp
            if received:
                await pubsub.acknowledge(path, [m.ack_id for m in received])
            if len(seen) >= total:
                done.set()

    loops = [asyncio.create_task(pull_loop()) for _ in range(pullers)]
    try:
        await offer(pubsub, rate_per_s, duration_s, sent, pending)
        await asyncio.wait_for(done.wait(), 30)
    finally:
        done.set()
        await asyncio.gather(*loops)
    return sorted((seen[i] - sent[i]) * 1000 for i in sent)
