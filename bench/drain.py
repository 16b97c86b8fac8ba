"""Scenario ``drain``: how fast the worker empties a backlog.

Pre-publishes 100k single-sample metrics messages and 20k feedback messages, then
times a worker process (``utxoiq-worker run``) until every row is in PostgreSQL.
In the same run, in interleaved rounds (each figure is the median of its rounds):
- the raw pull ceiling: a bare pull-and-ack loop on the same client, no database;
- the naive worker: the official streaming-pull callback, one ORM insert and
  commit per message, over 3k messages.
Scenario ``rss``: the worker's peak RSS while draining a 300k backlog.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
import uuid
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta

from bench.common import fresh_database, report, scratch_settings
from bench.stack import (
    bench_settings,
    fresh_topology,
    peak_rss_mb,
    publish_all,
    start_worker,
    stop_process,
    wait_for_rows,
)
from worker.config import Settings
from worker.pubsub.client import PubSub
from worker.sources.settings import PullSettings

METRICS = 100_000
FEEDBACK = 20_000
NAIVE = 3_000
RSS_BACKLOG = 300_000
WARM_UP = 200_000
ROUNDS = 3
"""Rounds of each drain figure; each is reported as the median of its rounds: one
round of the emulator can be twice as fast as the next (the bare loop: 18k and
46k msg/s in one run), and the ceiling with it."""
DATABASE = "utxoiq_bench_drain"
STALL_S = 60
"""A bare loop that has seen no message for this long fails instead of waiting forever."""


def metric_payloads(count: int, tag: str) -> list[bytes]:
    now = datetime.now(UTC)
    return [
        json.dumps(
            {
                "service_name": f"svc-{tag}-{i % 10}",
                "metric_type": ("cpu", "memory", "latency")[i % 3],
                "metric_value": (i % 1000) / 10,
                "unit": "percent",
                "timestamp": (now - timedelta(milliseconds=i)).isoformat(),
                "metadata": {"host": f"h{i % 16}"},
            }
        ).encode()
        for i in range(count)
    ]


def feedback_payloads(count: int, tag: str) -> list[bytes]:
    occurred_at = datetime.now(UTC).isoformat()
    return [
        json.dumps(
            {
                "insight_id": f"insight-{tag}-{i % 2000}",
                "user_id": f"user-{i}",
                "rating": i % 5 + 1,
                "comment": "useful" if i % 2 else None,
                "occurred_at": occurred_at,
            }
        ).encode()
        for i in range(count)
    ]


async def warm_up_emulator(pubsub: PubSub, pullers: int) -> None:
    """Publish, pull and ack ``WARM_UP`` messages before anything is timed.

    The emulator is a JVM: over its first few hundred thousand messages it compiles
    its hot paths and costs about twice the CPU per message it costs afterwards
    (measured on this machine kind: 85-120 us, then 35-55 us). Measured cold, the
    ceiling is low and the worker is slowed by the emulator, and the figures would
    say more about the JIT than about the worker; real Pub/Sub is never cold.
    """
    await publish_all(pubsub, "metrics", metric_payloads(WARM_UP, "warm-up"))
    await raw_pull_ceiling(pubsub, "metrics-worker", WARM_UP, pullers)


async def raw_pull_ceiling(pubsub: PubSub, subscription: str, count: int, pullers: int) -> float:
    path = pubsub.subscription(subscription)
    received = 0
    started = last_message = time.perf_counter()
    finished = 0.0

    async def loop() -> None:
        nonlocal received, last_message, finished
        while received < count:
            messages = await pubsub.pull(path, 1000, 2.0)
            if not messages:
                if time.perf_counter() - last_message > STALL_S:
                    raise RuntimeError(f"{subscription}: {received} of {count} messages came")
                continue
            last_message = time.perf_counter()
            received += len(messages)
            await pubsub.acknowledge(path, [m.ack_id for m in messages])
            if received >= count and not finished:
                finished = time.perf_counter()

    # Never cancel a pull in flight: the messages it leased would stay leased (and
    # hold up the emulator's deliveries) until their ack deadline.
    await asyncio.gather(*(loop() for _ in range(pullers)))
    return count / (finished - started)


def naive_worker_rate(settings: Settings, count: int) -> float:
    """The official subscriber's callback; one ORM insert and commit per message."""
    from google.cloud import pubsub_v1
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from bench.store import NaiveFeedback
    from worker.storage.database import create_engine

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    engine = create_engine(settings)
    sessions = async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)
    done = threading.Event()
    stored = 0
    lock = threading.Lock()

    async def store(payload: dict[str, object]) -> None:
        async with sessions() as session:
            session.add(
                NaiveFeedback(
                    insight_id=payload["insight_id"],
                    user_id=payload["user_id"],
                    rating=payload["rating"],
                    comment=payload["comment"],
                    created_at=datetime.fromisoformat(str(payload["occurred_at"])),
                    updated_at=datetime.fromisoformat(str(payload["occurred_at"])),
                    event_key=b"",
                )
            )
            await session.commit()

    def callback(message: pubsub_v1.subscriber.message.Message) -> None:
        nonlocal stored
        future: Future[None] = asyncio.run_coroutine_threadsafe(
            store(json.loads(message.data)), loop
        )
        future.result()
        message.ack()
        with lock:
            stored += 1
            if stored >= count:
                done.set()

    subscriber = pubsub_v1.SubscriberClient()
    path = subscriber.subscription_path(settings.google_cloud_project, "feedback-worker")
    started = time.perf_counter()
    streaming = subscriber.subscribe(path, callback=callback)
    done.wait(timeout=600)
    elapsed = time.perf_counter() - started
    streaming.cancel()  # shutdown begins
    streaming.result(timeout=30)  # and is over: no callback or ack left to run
    subscriber.close()
    asyncio.run_coroutine_threadsafe(engine.dispose(), loop).result()
    loop.call_soon_threadsafe(loop.stop)
    return count / elapsed


async def publish_backlog(pubsub: PubSub, tag: str) -> None:
    """The backlog each round drains: ``METRICS`` metrics and ``FEEDBACK`` feedback."""
    await publish_all(pubsub, "metrics", metric_payloads(METRICS, tag))
    await publish_all(pubsub, "feedback", feedback_payloads(FEEDBACK, tag))


async def _ceiling_rate(pubsub: PubSub, pullers: int) -> float:
    """The bare loop over the same backlog as the worker's: pulled and acked, no more."""
    await publish_backlog(pubsub, "ceiling")
    metrics_rate = await raw_pull_ceiling(pubsub, "metrics-worker", METRICS, pullers)
    feedback_rate = await raw_pull_ceiling(pubsub, "feedback-worker", FEEDBACK, pullers)
    return (METRICS + FEEDBACK) / (METRICS / metrics_rate + FEEDBACK / feedback_rate)


async def _drain_rate(settings: Settings, pubsub: PubSub) -> float:
    """A worker process draining the backlog into an empty database, from its start."""
    await fresh_database(DATABASE)  # recreated: every round writes into empty tables
    await publish_backlog(pubsub, uuid.uuid4().hex[:6])
    worker = start_worker(settings)
    started = time.monotonic()
    try:
        metrics_done, feedback_done = await asyncio.gather(
            wait_for_rows(settings, "SELECT count(*) FROM system_metrics", METRICS),
            wait_for_rows(settings, "SELECT count(*) FROM insight_feedback", FEEDBACK),
        )
    finally:
        stop_process(worker)
    return (METRICS + FEEDBACK) / (max(metrics_done, feedback_done) - started)


async def _naive_rate(settings: Settings) -> float:
    """The naive worker, on a Pub/Sub project of its own: on the emulator the official
    client's stream outlives its shutdown and goes on leasing what is published next
    (about 1000 messages, measured), which would starve the next round."""
    own = bench_settings(settings)
    pubsub = await fresh_topology(own)
    try:
        await publish_all(pubsub, "feedback", feedback_payloads(NAIVE, "naive"))
        return await asyncio.to_thread(naive_worker_rate, own, NAIVE)
    finally:
        await pubsub.close()


async def run() -> None:
    # Each round creates the database afresh (_drain_rate).
    settings = bench_settings(scratch_settings(DATABASE))
    pubsub = await fresh_topology(settings)
    # As many concurrent pulls as the worker makes: same client, same concurrency.
    pullers = PullSettings().pullers
    ceilings, drains, naives = [], [], []
    try:
        await warm_up_emulator(pubsub, pullers)
        # Interleaved, so a slow spell of the emulator (a GC, a recompilation) falls
        # on one round of each figure rather than on one figure.
        for _ in range(ROUNDS):
            ceilings.append(await _ceiling_rate(pubsub, pullers))
            drains.append(await _drain_rate(settings, pubsub))
            naives.append(await _naive_rate(settings))
        drain_rate = statistics.median(drains)
        report(
            "drain",
            "msgs_per_s",
            drain_rate,
            "raw_pull_ceiling",
            statistics.median(ceilings),
            rounds=list(zip(drains, ceilings, strict=True)),
        )
        report(
            "drain",
            "msgs_per_s",
            drain_rate,
            "naive_worker",
            statistics.median(naives),
            rounds=list(zip(drains, naives, strict=True)),
        )
    finally:
        await pubsub.close()


async def run_rss() -> None:
    settings = bench_settings(await fresh_database("utxoiq_bench_rss"))
    pubsub = await fresh_topology(settings)
    try:
        await publish_all(pubsub, "metrics", metric_payloads(RSS_BACKLOG, "rss"))
        worker = start_worker(settings, "--only", "metrics")
        try:
            await wait_for_rows(settings, "SELECT count(*) FROM system_metrics", RSS_BACKLOG)
            rss = peak_rss_mb(worker.pid)
        finally:
            stop_process(worker)
        report("rss", "peak_rss_mb", rss)
    finally:
        await pubsub.close()
