"""Scenario ``retention``: ``utxoiq-worker retention run --table system_metrics`` on 2M rows.

The data (``bench.retention_data``): 2M ``system_metrics`` rows past the 90-day window
in a scratch database, 1.6M in four whole months (exported, partitions dropped) and
0.4M in the month of the cutoff (chunked DELETE), with 100k rows in the window that
stay; frozen, analysed and checkpointed before anything is timed. Figures, each with
its baseline measured in the same run:

- ``archive_rows_per_s``: rows archived (``count(*)`` before minus after) over the
  wall time of ``python -m worker retention run --table system_metrics`` (its start,
  imports and ledger included; ``ARCHIVE_URL`` a ``file://`` temporary directory),
  against ``copy_to_devnull_rows_per_s``: the same rows' archive lines,
  ``COPY (SELECT <METRICS.line_sql> FROM system_metrics WHERE "timestamp" < cutoff)
  TO STDOUT`` with the worker's CSV options and time zone, in one statement, no ORDER
  BY, read by asyncpg ``copy_from_query`` into a callback that drops the bytes: rows
  from COPY's status over its wall time. Same data, cache warm for both (the vacuum
  read every page). Goal: ratio >= 0.5;
- ``peak_rss_mb``: that run's, as ``backup`` measures it (``bench.stack.TreePeakRss``).
  Goal: <= 150 MB;
- ``p99_ms`` (and ``p50_ms``): publish-to-commit latency (publisher's clock before the
  publish call to the row being seen committed, polled every 5 ms) of one-sample
  metrics messages offered at 500 msg/s for 20 s to a running ``worker run --only
  metrics`` while a retention run works, against ``p99_ms_without_retention`` (and
  ``p50_ms_without_retention``): the same offer for the 20 s just before, no run.
  Both follow a 3 s unmeasured warm-up. For this part the database is seeded again:
  one whole month of 100k rows and the cutoff's month with three times what the first
  run deleted of it in 20 s (at least 1.6M), so that the window, from the run taking
  its advisory lock, holds a partition's export and DETACH/DROP, then chunked deletes;
  the run must still be deleting when the window ends (checked; if not, measured again
  on twice the rows, at most twice).

Progress, and where the worker's run spent its time (from its log events), go to stderr.
The scenario takes 3 to 4 minutes on 2 cores, most of it seeding and the runs.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from bench.backup import WorkerRun, run_worker
from bench.common import _as_admin, asyncpg_dsn, fresh_database, percentile, report
from bench.retention_data import (
    ARCHIVED_ROWS,
    PARTIAL_ROWS,
    ROUND_ROWS,
    WINDOW_DAYS,
    Layout,
    say,
    seed,
)
from bench.stack import bench_settings, fresh_topology, start_worker, stop_process
from bench.steady import latencies_ms
from handlers.retention.sweep import COPY_OPTIONS
from handlers.retention.tables import METRICS
from handlers.retention.task import RUN_LOCK
from worker.config import Settings

SCENARIO = "retention"
DATABASE = "utxoiq_bench_retention"
RATE_PER_S = 500
DURATION_S = 20
WARMUP_S = 3
# The ingestion part's data: one whole month of these rows, and the cutoff's month's.
INGEST_MONTH_ROWS = 100_000
# The run must still be deleting when the window ends: the cutoff's month is seeded
# with what the first run deleted of it in INGEST_MARGIN times the window, at the
# least INGEST_PARTIAL_ROWS (a faster machine finished a fixed number inside it). The
# first run deletes it beside other months; alone it goes up to twice as fast, so a
# run that ends inside the window is measured again on twice the rows.
INGEST_PARTIAL_ROWS = 1_600_000
INGEST_MARGIN = 3
INGEST_ATTEMPTS = 3


RUN_ARGS = ("retention", "run", "--table", "system_metrics")
LOCK_SQL = """SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted
AND classid = $1::bigint::oid AND objid = $2::bigint::oid AND objsubid = 1"""
PAST_SQL = 'SELECT count(*) FROM system_metrics WHERE "timestamp" < $1'


class _RunTooShort(RuntimeError):
    """The retention run ended inside the measured window."""


async def copy_to_devnull(settings: Settings, cutoff: datetime) -> float:
    """The baseline: the archive lines of every row before ``cutoff`` by one COPY,
    dropped as they arrive; rows/s."""
    conn = await asyncpg.connect(asyncpg_dsn(settings))
    try:
        await conn.execute("SET TIME ZONE 'UTC'")

        async def drop(_data: bytes) -> None:
            pass

        query = f'SELECT {METRICS.line_sql} FROM system_metrics WHERE "timestamp" < $1'
        started = time.perf_counter()
        status = await conn.copy_from_query(query, cutoff, output=drop, **COPY_OPTIONS)
        seconds = time.perf_counter() - started
    finally:
        await conn.close()
    rows = int(status.split()[-1])
    if rows != ARCHIVED_ROWS:
        raise RuntimeError(f"COPY read {rows} rows, {ARCHIVED_ROWS} seeded past the cutoff")
    say(f"COPY to nowhere: {rows:,} rows in {seconds:.1f} s")
    return rows / seconds


def worker_env(settings: Settings, archive: Path) -> dict[str, str]:
    env = {**os.environ, "DATABASE_URL": settings.database_url, "LOG_LEVEL": "INFO"}
    env["ARCHIVE_URL"] = archive.as_uri()
    return env


async def forget_runs(settings: Settings) -> None:
    """Today's run is done once: forget it, or the next run is a no-op."""
    conn = await asyncpg.connect(asyncpg_dsn(settings))
    try:
        await conn.execute("DELETE FROM maintenance_runs")
    finally:
        await conn.close()


def _at(run: WorkerRun, message: str) -> datetime:
    return datetime.fromisoformat(str(run.event(message)["time"]))


def say_breakdown(run: WorkerRun, spawned: datetime, ended: datetime) -> None:
    """Where the run's wall time went, from the times of its log events (months go
    several at once: the cutoff's month is timed from the run's start)."""
    started = _at(run, "maintenance run started")
    partial = _at(run, "retention archived rows")
    dropped = "retention dropped a month"
    archived = max(partial, _at(run, dropped)) if dropped in run.events else partial
    finished = _at(run, "maintenance run succeeded")
    parts = {
        "start-up": started - spawned,
        "every month (the cutoff's month within it)": archived - started,
        "the cutoff's month": partial - started,
        "its identities, ledger": finished - archived,
        "exit": ended - finished,
    }
    say("run breakdown: " + ", ".join(f"{k} {v.total_seconds():.1f} s" for k, v in parts.items()))


async def count(settings: Settings, sql: str, *args: object) -> int:
    conn = await asyncpg.connect(asyncpg_dsn(settings))
    try:
        return int(await conn.fetchval(sql, *args))
    finally:
        await conn.close()


async def past_rows(settings: Settings) -> int:
    """Rows past the window now."""
    return await count(settings, PAST_SQL, datetime.now(UTC) - timedelta(days=WINDOW_DAYS))


async def archive_run(settings: Settings, archive: Path) -> tuple[float, float, float]:
    """``retention run --table system_metrics``, timed; (rows/s, peak RSS MB, the
    cutoff's month's rows deleted a second)."""
    before = await count(settings, "SELECT count(*) FROM system_metrics")
    await forget_runs(settings)
    await _as_admin("CHECKPOINT")
    spawned, started = datetime.now(UTC), time.perf_counter()
    run = await asyncio.to_thread(run_worker, worker_env(settings, archive), *RUN_ARGS)
    seconds = time.perf_counter() - started
    archived = before - await count(settings, "SELECT count(*) FROM system_metrics")
    if archived != ARCHIVED_ROWS or await past_rows(settings):
        raise RuntimeError(f"{archived} rows archived of {ARCHIVED_ROWS}, or some left")
    say(f"retention run: {archived:,} rows in {seconds:.1f} s, {run.peak_rss_mb:.0f} MB RSS")
    say_breakdown(run, spawned, spawned + timedelta(seconds=seconds))
    partial_s = _at(run, "retention archived rows") - _at(run, "maintenance run started")
    return archived / seconds, run.peak_rss_mb, PARTIAL_ROWS / partial_s.total_seconds()


async def _lock_taken(dsn: str, run: asyncio.Future[WorkerRun]) -> None:
    """Return once the retention run holds its advisory lock (its work has begun)."""
    conn = await asyncpg.connect(dsn)
    try:
        while not await conn.fetchval(LOCK_SQL, RUN_LOCK >> 32, RUN_LOCK & 0xFFFFFFFF):
            if run.done():
                run.result()  # its error, if it failed
                raise RuntimeError("the retention run ended before it was seen to start")
            await asyncio.sleep(0.01)
    finally:
        await conn.close()


async def ingest_p99s(settings: Settings, archive: Path) -> tuple[list[float], list[float]]:
    """Latencies of ``DURATION_S`` without a retention run, then during one."""
    settings = bench_settings(settings)
    dsn, pubsub = asyncpg_dsn(settings), await fresh_topology(settings)
    worker = start_worker(settings, "--only", "metrics")
    try:
        await latencies_ms(pubsub, dsn, RATE_PER_S, WARMUP_S)
        idle = await latencies_ms(pubsub, dsn, RATE_PER_S, DURATION_S)
        await forget_runs(settings)
        env = worker_env(settings, archive)
        run = asyncio.ensure_future(asyncio.to_thread(run_worker, env, *RUN_ARGS))
        try:
            await _lock_taken(dsn, run)
            during = await latencies_ms(pubsub, dsn, RATE_PER_S, DURATION_S)
            left = await past_rows(settings)
            if run.done() or not left:
                raise _RunTooShort("the retention run was done within the window")
            say(f"{left:,} rows still past the window when it ended")
        finally:
            await asyncio.wait([run])
        run.result()
    finally:
        stop_process(worker)
        await pubsub.close()
    return idle, during


async def run() -> None:
    settings = await fresh_database(DATABASE)
    layout = Layout(datetime.now(UTC))
    await seed(settings, layout, round_no=0)
    copy_rate = await copy_to_devnull(settings, layout.cutoff)
    with tempfile.TemporaryDirectory(prefix="utxoiq-bench-retention-") as directory:
        rate, rss_mb, partial_per_s = await archive_run(settings, Path(directory) / "archive")
        report(SCENARIO, "archive_rows_per_s", rate, "copy_to_devnull_rows_per_s", copy_rate)
        report(SCENARIO, "peak_rss_mb", rss_mb)
        partial_rows = max(int(partial_per_s * DURATION_S * INGEST_MARGIN), INGEST_PARTIAL_ROWS)
        for attempt in range(1, INGEST_ATTEMPTS + 1):
            partial_rows = min(partial_rows, ROUND_ROWS // 2)  # a round's ids stay its own
            say(f"the ingestion part's cutoff month: {partial_rows:,} rows")
            layout = Layout(datetime.now(UTC), 1, INGEST_MONTH_ROWS, partial_rows)
            await seed(settings, layout, round_no=attempt)
            try:
                idle, during = await ingest_p99s(settings, Path(directory) / f"archive-{attempt}")
                break
            except _RunTooShort:
                if attempt == INGEST_ATTEMPTS:
                    raise
                say("the run ended inside the window: again, on twice the rows")
                partial_rows *= 2
    for name, latencies in (("without retention", idle), ("during retention", during)):
        say(
            f"ingestion {name}: p50 {percentile(latencies, 50):.1f}, p99 "
            f"{percentile(latencies, 99):.1f}, max {latencies[-1]:.1f} ms"
        )
    for percent in (50, 99):
        without = f"p{percent}_ms_without_retention"
        report(
            SCENARIO,
            f"p{percent}_ms",
            percentile(during, percent),
            without,
            percentile(idle, percent),
        )
