"""Scenario ``batched``: 2k metrics messages of 500 samples each, drained by the
worker; rows/s against asyncpg ``copy_records_to_table`` of the same rows, same table,
same run."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg

from bench.common import asyncpg_dsn, fresh_database, report
from bench.stack import bench_settings, fresh_topology, start_worker, stop_process, wait_for_rows
from handlers.metrics import METRIC_COLUMNS
from worker.pubsub.client import PubsubMessage

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
