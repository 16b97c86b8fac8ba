"""Scenarios ``batched`` and ``latency`` of the pull worker.

- batched: 2k metrics messages of 500 samples each, drained by the worker; rows/s
  against asyncpg ``copy_records_to_table`` of the same rows, same table, same run.
- latency: 1k msg/s offered for 30 s to a running worker; p50 and p99 of the time
  from publish (the publisher's clock before the call) to the row being visible
  (committed) in PostgreSQL, which the benchmark polls every 5 ms.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg

from bench.common import asyncpg_dsn, fresh_database, report
from bench.stack import bench_settings, fresh_topology, start_worker, stop_process, wait_for_rows
from handlers.metrics import METRIC_COLUMNS
from worker.pubsub.client import PubSub, PubsubMessage

MESSAGES = 2000
SAMPLES_PER_MESSAGE = 500
RATE_PER_S = 1000
DURATION_S = 30
TICK_S = 0.01


def _sample(i: int, now: datetime) -> dict[str, object]:
    return {
        "event_id": str(uuid.uuid4()),
        "service_name": f"svc-{i % 50}",
        "metric_type": ("cpu", "memory", "latency", "rps")[i % 4],
        "metric_value": (i % 1000) / 10,
        "unit": "percent",
        "timestamp": (now - timedelta(milliseconds=i)).isoformat(),
        "metadata": {"host": f"h{i % 16}"},
    }


async def run_batched() -> None:
    settings = bench_settings(await fresh_database("utxoiq_bench_batched"))
    pubsub = await fresh_topology(settings)
    now = datetime.now(UTC)
    messages = [
        [_sample(m * SAMPLES_PER_MESSAGE + i, now) for i in range(SAMPLES_PER_MESSAGE)]
        for m in range(MESSAGES)
    ]
    rows = MESSAGES * SAMPLES_PER_MESSAGE
    raw = await asyncpg.connect(asyncpg_dsn(settings))
    try:
        records = [
            (
                uuid.UUID(str(s["event_id"])),
                s["service_name"],
                s["metric_type"],
                s["metric_value"],
                s["unit"],
                datetime.fromisoformat(str(s["timestamp"])),
                json.dumps(s["metadata"]),
            )
            for batch in messages
            for s in batch
        ]
        columns = list(METRIC_COLUMNS)
        started = time.perf_counter()
        for i in range(0, len(records), 5000):
            await raw.copy_records_to_table(
                "system_metrics", records=records[i : i + 5000], columns=columns
            )
        copy_rate = rows / (time.perf_counter() - started)
        await raw.execute("TRUNCATE system_metrics, system_metric_ids")
        del records

        target = pubsub.topic("metrics")
        for i in range(0, MESSAGES, 50):
            await pubsub.publish(
                target,
                [
                    PubsubMessage(data=json.dumps({"metrics": m}).encode())
                    for m in messages[i : i + 50]
                ],
                timeout_s=120,
            )
        worker = start_worker(settings, "--only", "metrics")
        started = time.perf_counter()
        try:
            await wait_for_rows(settings, "SELECT count(*) FROM system_metric_ids", rows)
        finally:
            stop_process(worker)
        write_rate = rows / (time.perf_counter() - started)
        report("batched", "rows_per_s", write_rate, "copy_records_to_table", copy_rate)
    finally:
        await raw.close()
        await pubsub.close()


async def _offer(pubsub: PubSub, sent: dict[uuid.UUID, float]) -> None:
    """Publish RATE_PER_S messages a second, TICK_S apart, for DURATION_S."""
    target = pubsub.topic("metrics")
    per_tick = int(RATE_PER_S * TICK_S)
    start = time.monotonic()
    ticks = int(DURATION_S / TICK_S)
    for tick in range(ticks):
        due = start + tick * TICK_S
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        now = datetime.now(UTC)
        ids = [uuid.uuid4() for _ in range(per_tick)]
        payloads = [
            PubsubMessage(data=json.dumps({**_sample(tick, now), "event_id": str(i)}).encode())
            for i in ids
        ]
        stamp = time.monotonic()
        for i in ids:
            sent[i] = stamp
        await pubsub.publish(target, payloads)


async def _watch(
    settings_dsn: str, sent: dict[uuid.UUID, float], seen: dict[uuid.UUID, float], total: int
) -> None:
    conn = await asyncpg.connect(settings_dsn)
    try:
        deadline = time.monotonic() + DURATION_S + 60
        while len(seen) < total and time.monotonic() < deadline:
            pending = [i for i in sent if i not in seen]
            if pending:
                found = await conn.fetch(
                    "SELECT id FROM system_metric_ids WHERE id = ANY($1::uuid[])", pending
                )
                stamp = time.monotonic()
                for record in found:
                    seen[record["id"]] = stamp
            await asyncio.sleep(0.005)
    finally:
        await conn.close()


async def run_latency() -> None:
    settings = bench_settings(await fresh_database("utxoiq_bench_latency"))
    pubsub = await fresh_topology(settings)
    worker = start_worker(settings, "--only", "metrics")
    sent: dict[uuid.UUID, float] = {}
    seen: dict[uuid.UUID, float] = {}
    total = int(RATE_PER_S * TICK_S) * int(DURATION_S / TICK_S)
    try:
        await asyncio.gather(_offer(pubsub, sent), _watch(asyncpg_dsn(settings), sent, seen, total))
    finally:
        stop_process(worker)
        await pubsub.close()
    if len(seen) < total:
        raise RuntimeError(f"only {len(seen)} of {total} messages were committed")
    latencies_ms = sorted((seen[i] - sent[i]) * 1000 for i in sent)
    quantiles = statistics.quantiles(latencies_ms, n=100)
    report("latency", "p50_ms", quantiles[49])
    report("latency", "p99_ms", quantiles[98])
