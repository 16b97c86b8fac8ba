"""Scenario ``latency``: publish-to-commit latency of a steady 1k msg/s, and where it goes.

One-sample metrics messages are offered at 1k msg/s (``bench.steady``) for 30 s to a
running ``worker run --only metrics`` (one process). Figures:

- ``p50_ms`` / ``p99_ms``: publisher's clock before the publish call to the row seen
  committed (polled every 5 ms), against ``pull_floor_p50_ms`` / ``pull_floor_p99_ms``:
  the same offer for 10 s just before, received by bare long-polling pull-and-ack
  loops (as many as the worker runs), no worker. The emulator answers a waiting pull
  only on its next check of hanging pulls, every 50 ms (its
  ``HANGING_PULL_POLLING_INTERVAL_MS``), so that floor's p99 is near 50 ms whatever
  the worker does; the worker's own share is the difference.
- ``stage_<stage>_{p50,p99,max}_ms``: the worker's ``worker.stage.duration``
  histogram (``worker.telemetry.STAGES``, each value the slowest message of a batch,
  or of an ack request), read from its console export at exit.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.common import asyncpg_dsn, fresh_database, percentile, report
from bench.stack import bench_settings, fresh_topology, start_worker, stop_process
from bench.stages import read_stages
from bench.steady import latencies_ms, pull_floor_ms
from handlers import registry
from worker.sources.settings import PullSettings
from worker.telemetry import STAGES

SCENARIO = "latency"
TOPIC = "metrics"
RATE_PER_S = 1000
FLOOR_S = 10
DURATION_S = 30


async def run() -> None:
    settings = bench_settings(await fresh_database("utxoiq_bench_latency"))
    pubsub = await fresh_topology(settings)
    try:
        subscription = registry()[TOPIC].subscription
        floor = await pull_floor_ms(
            pubsub, subscription, RATE_PER_S, FLOOR_S, PullSettings().pullers
        )
        with tempfile.TemporaryDirectory(prefix="utxoiq-bench-latency-") as scratch:
            metrics = Path(scratch) / "metrics.jsonl"
            worker = start_worker(settings, "--only", TOPIC, metrics_to=metrics)
            try:
                latencies = await latencies_ms(
                    pubsub, asyncpg_dsn(settings), RATE_PER_S, DURATION_S
                )
            finally:
                stop_process(worker)
            stages = read_stages(metrics, TOPIC)
    finally:
        await pubsub.close()
    for percent in (50, 99):
        report(
            SCENARIO,
            f"p{percent}_ms",
            percentile(latencies, percent),
            f"pull_floor_p{percent}_ms",
            percentile(floor, percent),
        )
    for stage in STAGES:
        if stage in stages:
            report(SCENARIO, f"stage_{stage}_p50_ms", stages[stage].p50_ms)
            report(SCENARIO, f"stage_{stage}_p99_ms", stages[stage].p99_ms)
            report(SCENARIO, f"stage_{stage}_max_ms", stages[stage].max_ms)
