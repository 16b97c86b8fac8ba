"""``utxoiq-worker demo``: the main job on sample data, printed.

Migrates, applies the Pub/Sub topology, starts the pull worker, publishes sample
events for every topic (with a duplicate, an out-of-order event and a few bad
messages), waits until they are settled, and prints the stored rows and the dead
letters with their reasons. Then the data service layer on its own, and last a
backup of the demo database restored into a second one.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from worker.cli.demo_backup import backup_and_restore
from worker.config import Settings
from worker.pubsub import topology
from worker.pubsub.client import PubSub, PubsubMessage
from worker.pubsub.names import dead_letter_subscription
from worker.read.service import DatabaseService
from worker.runtime import Runtime
from worker.sources.pull_worker import PullWorker
from worker.storage.migrate import upgrade
from worker.topics import Registry

SETTLE_TIMEOUT_S = 60


def _show(title: str, value: Any) -> None:
    print(f"\n== {title}")
    items = value if isinstance(value, list) else [value]
    for item in items:
        data = item.model_dump(mode="json") if hasattr(item, "model_dump") else item
        print("  " + json.dumps(data, ensure_ascii=False))


def _sample_feedback(insight: str, t: list[str]) -> list[dict[str, Any]]:
    """Three opinions of two users; user 1's later one (5 stars) wins."""
    return [
        {
            "insight_id": insight,
            "user_id": "user_1",
            "rating": 5,
            "comment": "Great insight!",
            "occurred_at": t[2],
        },
        {"insight_id": insight, "user_id": "user_1", "rating": 2, "occurred_at": t[0]},
        {
            "insight_id": insight,
            "user_id": "user_2",
            "rating": 4,
            "flag_type": "misleading",
            "flag_reason": "axis starts at 40k",
            "occurred_at": t[1],
        },
    ]


def _sample_events(run: str, now: datetime) -> dict[str, list[bytes]]:
    job = str(uuid.uuid4())
    t = [(now - timedelta(minutes=m)).isoformat().replace("+00:00", "Z") for m in (30, 20, 10)]
    progress = {
        "job_id": job,
        "job_type": "blocks",
        "start_block": 800_000,
        "end_block": 810_000,
        "created_by": "demo",
    }
    backfill = [
        {**progress, "current_block": 800_000, "status": "running", "occurred_at": t[0]},
        {**progress, "current_block": 810_000, "status": "completed", "occurred_at": t[2]},
        # Published last, happened in between: it neither rewinds nor reopens the job.
        {**progress, "current_block": 805_000, "status": "running", "occurred_at": t[1]},
    ]
    insight = f"insight_{run}"
    feedback = _sample_feedback(insight, t)
    metrics = [
        {
            "service_name": f"web-api-{run}",
            "metric_type": "cpu",
            "metric_value": 40.0 + i,
            "unit": "percent",
            "timestamp": t[i % 3],
            "metadata": {"host": f"host-{i}"},
        }
        for i in range(3)
    ]

    def encode(event: dict[str, Any]) -> bytes:
        return json.dumps(event).encode()

    conflict = {**backfill[0], "job_type": "transactions"}  # fixed fields never change
    return {
        "backfill-progress": [*map(encode, backfill), encode(backfill[0]), encode(conflict)],
        "feedback": [
            *map(encode, feedback),
            b"{not json",
            b"\xff\xfe not UTF-8",
            encode({"insight_id": insight}),  # required fields missing
        ],
        "metrics": [
            encode({"metrics": metrics}),
            encode(metrics[0]),  # the same sample again: stored once
            encode({**metrics[0], "metric_value": "high"}),
        ],
    }


async def _publish(pubsub: PubSub, events: dict[str, list[bytes]]) -> None:
    for topic_name, payloads in events.items():
        # One at a time, so that the conflicting event comes after its job exists.
        for data in payloads:
            await pubsub.publish(pubsub.topic(topic_name), [PubsubMessage(data=data)])


async def _dead_letters(
    pubsub: PubSub, topics: list[str], since: datetime, expected: int
) -> list[dict[str, Any]]:
    """This run's dead letters (an emulator may hold older ones: they are acked, unshown)."""
    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while len(found) < expected and time.monotonic() < deadline:
        for topic in topics:
            path = pubsub.subscription(dead_letter_subscription(topic))
            received = await pubsub.pull(path, 100, 0.5)
            if received:
                await pubsub.acknowledge(path, [r.ack_id for r in received])
            for r in received:
                attributes = dict(r.message.attributes)
                published = datetime.fromisoformat(attributes["source_publish_time"])
                if published < since:
                    continue
                found.append(
                    {
                        "topic": attributes["source_topic"],
                        "reason": attributes["dead_letter_reason"],
                        "detail": attributes["dead_letter_detail"],
                        "data": r.message.data[:60].decode("utf-8", "replace"),
                    }
                )
    return found


async def _wait_until(check: Any) -> None:
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while not await check() and time.monotonic() < deadline:  # noqa: ASYNC110 - polls the database
        await asyncio.sleep(0.1)


async def run_demo(settings: Settings, registry: Registry) -> int:
    await upgrade(settings, registry)
    counts = await topology.apply(settings, registry)
    print(f"topology: {counts}")
    run = uuid.uuid4().hex[:6]
    now = datetime.now(UTC).replace(microsecond=0)
    started = datetime.now(UTC) - timedelta(seconds=5)  # publish times are the server's
    runtime = Runtime(settings, registry)
    worker = PullWorker(runtime, registry.pulled_by_default())
    await worker.start()
    db = DatabaseService(runtime.engine, runtime.invalidations)
    try:
        events = _sample_events(run, now)
        await _publish(runtime.pubsub, events)
        dead = await _dead_letters(runtime.pubsub, list(events), started, expected=5)
        job_id = uuid.UUID(json.loads(events["backfill-progress"][0])["job_id"])

        async def all_stored() -> bool:
            rows = await db.get_metrics(f"web-api-{run}", "cpu")
            return len(rows) == 3

        await _wait_until(all_stored)
        await _show_stored(db, run, job_id, dead)
    finally:
        await worker.stop()
        await runtime.close()
    await backup_and_restore(settings)
    return 0


async def _show_stored(
    db: DatabaseService, run: str, job_id: uuid.UUID, dead: list[dict[str, Any]]
) -> None:
    _show(
        "backfill job (3 events, one duplicate, out of order)",
        await db.get_backfill_job(job_id),
    )
    _show(
        "feedback rows (last writer by occurred_at wins)",
        await db.list_feedback(insight_id=f"insight_{run}"),
    )
    _show("feedback stats", await db.get_feedback_stats(f"insight_{run}"))
    _show(
        "metrics (4 samples published, 3 distinct)",
        await db.get_metrics(f"web-api-{run}", "cpu"),
    )
    _show("dead letters", dead)
