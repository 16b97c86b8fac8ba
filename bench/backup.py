"""Scenario ``backup``: ``utxoiq-worker backup run`` and ``backup restore`` on 2 GB.

The data: database ``utxoiq_bench_backup``, kept between runs (not a scratch one),
migrated to head and filled server-side: 12 monthly ``system_metrics`` partitions
with their ``system_metric_ids``, feedback, backfill jobs; values and JSONB varied so
that dumps compress like real data. Rebuilt only when missing, when its rows
(``pg_table_size`` of every user table: heap and TOAST, no index) are under 2 GB, or
when ``bench_backup_marker`` holds another DATA_VERSION. MB are MiB. Figures (once
each, with their baselines, in one run; a checkpoint before every timed part):
- ``database_mb``: the rows' size, as above;
- ``backup_mb_per_s``: size_bytes / seconds of the worker's "backup dumped", against
  ``pg_dump_devnull_mb_per_s``: ``pg_dump -Fc`` piped into a reader that only counts
  (1 MiB pipe and reads), output bytes over wall time from start to exit: the dump
  with no store behind it. Goal: ratio >= 0.8. The cache is warm for both: an
  untimed ``pg_dump -Fc -f`` (the restore baseline's file) runs first;
- ``verify_s``: seconds of "backup verified" (restore into a scratch database);
- ``peak_rss_mb``: ``ru_maxrss`` of ``os.wait4`` on ``backup run``: the largest of the
  worker and the children it waited for (pg_dump, pg_restore). Goal: <= 150 MB;
- ``restore_mb_per_s``: size_bytes / seconds of "backup restored" (``backup restore
  --latest --jobs 2`` into an empty database), against ``pg_restore_local_mb_per_s``:
  ``pg_restore -j 2`` of the local file into another, its bytes over wall time.
``python -m bench.backup --baselines-only``: the data, database_mb and the baselines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from bench import common
from bench.common import _as_admin, _drop, asyncpg_dsn, report, scratch_settings
from handlers import registry
from worker.cli.main import run_async
from worker.config import Settings
from worker.storage.migrate import upgrade

SCENARIO = "backup"
DATABASE = "utxoiq_bench_backup"
DATA_VERSION = "1"
"""Kept in ``bench_backup_marker``: change it when the generated data changes."""
MIN_ROWS_MB = 2048
MONTHS = 12
FIRST_MONTH = (2025, 12)
METRICS_PER_MONTH = 480_000
PARTS_PER_MONTH = 4
FEEDBACK_ROWS = 300_000
BACKFILL_JOBS = 30_000
GENERATORS = 2  # connections filling the database at once: one per core
JOBS = 2  # --jobs of both restores
MIB = 1024 * 1024

# $1 month start, $2 first row, $3 last row, $4 seconds between samples, $5 the month's
# first row. hashint8extended of the row number makes every value: the same data each build.
METRICS_SQL = """
WITH src AS (
    SELECT g, h, k, 1 + (h & 15)::int AS s, 1 + ((h >> 4) & 7)::int AS t
    FROM generate_series($2::bigint, $3::bigint) AS g,
         hashint8extended(g, 0) AS h, hashint8extended(g, 1) AS k
), inserted AS (
    INSERT INTO system_metrics
        (id, service_name, metric_type, metric_value, unit, "timestamp", metadata)
    SELECT md5('metric:' || g)::uuid,
        (ARRAY['blockchain-ingest', 'insight-generator', 'api-gateway', 'web-frontend',
               'chart-renderer', 'alert-engine', 'feature-engine', 'persistence-worker', 'x-bot',
               'email-digest', 'mempool-watcher', 'price-oracle', 'entity-resolver', 'billing',
               'auth', 'search'])[s],
        (ARRAY['cpu', 'memory', 'latency', 'requests', 'errors', 'queue_depth', 'block_lag',
               'cache_hit_ratio'])[t],
        floor((ARRAY[100, 4096, 900, 5000, 50, 20000, 12, 1])[t] * 1000
              * (0.5 + 0.35 * sin(g / 5000.0) + 0.15 * ((h >> 16) & 65535) / 65536.0)) / 1000.0,
        (ARRAY['percent', 'megabytes', 'milliseconds', 'per_second', 'per_minute', 'messages',
               'blocks', 'ratio'])[t],
        $1::timestamptz + ((g - $5::bigint) * $4::float8 + ((h >> 32) & 1023) / 1024.0)
                          * interval '1 second',
        jsonb_build_object(
            'host', 'node-' || ((h >> 42) & 63),
            'region', (ARRAY['us-central1', 'us-east1', 'europe-west1', 'asia-east1'])
                      [1 + ((h >> 48) & 3)::int],
            'pod', 'svc-' || s || '-' || to_hex((k & 1048575)::int),
            'version', '1.' || (g / 400000) % 20 || '.' || ((k >> 20) & 15),
            'block_height', 870000 + g / 150,
            'trace_id', to_hex(k),
            'labels', jsonb_build_object(
                'env', (ARRAY['prod', 'prod', 'prod', 'staging'])[1 + ((k >> 24) & 3)::int],
                'shard', (k >> 26) & 7, 'canary', (k >> 29) & 15 = 0))
    FROM src
    RETURNING id, "timestamp"
)
INSERT INTO system_metric_ids (id, "timestamp") SELECT id, "timestamp" FROM inserted
"""

# $1 first created_at, $2 rows. Rater k of insight i (g = k * 40000 + i) is user
# (31 i + 104729 k) mod 200000, different for each k < 8: (insight, user) is unique.
FEEDBACK_SQL = """
INSERT INTO insight_feedback (id, insight_id, user_id, rating, comment, flag_type,
                              flag_reason, created_at, updated_at, event_key)
SELECT md5('feedback:' || g)::uuid,
    'insight-' || substr(md5('insight:' || (g % 40000)), 1, 16),
    'user_' || ((g % 40000) * 31 + (g / 40000) * 104729) % 200000,
    CASE WHEN h % 10 <> 0 THEN 1 + abs(h % 5)::int END,
    CASE WHEN (h >> 8) & 3 <> 0
         THEN (ARRAY['useful', 'spot on, acted on it', 'too late to matter', 'the chart helped',
                     'numbers look off for this block range', 'please add the fee breakdown'])
              [1 + ((h >> 10) & 255)::int % 6]
              || CASE WHEN (h >> 18) & 1 = 1 THEN ' (block ' || 870000 + g % 9000 || ')' ELSE '' END
    END,
    CASE WHEN (h >> 20) & 31 = 0
         THEN (ARRAY['inaccurate', 'misleading', 'spam', 'other'])[1 + ((h >> 25) & 3)::int] END,
    CASE WHEN (h >> 20) & 31 = 0 THEN 'reported from the insight page, id ' || to_hex(h) END,
    $1::timestamptz + g * interval '97 seconds',
    $1::timestamptz + g * interval '97 seconds' + ((h >> 32) & 65535) * interval '1 second',
    sha256(convert_to('feedback:' || g, 'UTF8'))
FROM generate_series(0, $2::bigint - 1) AS g, hashint8extended(g, 2) AS h
"""

# $1 first started_at, $2 rows. Status: 10/16 completed, 3 running, 1 paused, 2 failed.
BACKFILL_SQL = """
WITH src AS (
    SELECT g, h, (h >> 8) & 1048575 AS lo, 1 + ((h >> 28) & 65535) AS span,
           CASE WHEN (h >> 50) & 15 < 10 THEN 'completed' WHEN (h >> 50) & 15 < 13 THEN 'running'
                WHEN (h >> 50) & 15 < 14 THEN 'paused' ELSE 'failed' END AS status,
           $1::timestamptz + g * interval '17 minutes' AS started
    FROM generate_series(0, $2::bigint - 1) AS g, hashint8extended(g, 3) AS h
), jobs AS (
    SELECT *, CASE WHEN status = 'completed' THEN lo + span
                   ELSE lo + (span * ((h >> 44) & 63) / 64) END AS cur,
           CASE WHEN status = 'completed' THEN started + span * interval '40 ms' END AS done
    FROM src
)
INSERT INTO backfill_jobs (id, job_type, start_block, end_block, current_block, status,
    progress_percentage, estimated_completion, error_message, started_at, completed_at,
    created_by, status_event_at, status_event_key, first_event_key, completing_event_key)
SELECT md5('job:' || g)::uuid,
    (ARRAY['historical_blocks', 'insight_regen', 'metrics_rebuild', 'mempool'])[1 + (h & 3)::int],
    lo, lo + span, cur, status, round(100.0 * (cur - lo) / span, 2),
    CASE WHEN status IN ('running', 'paused') THEN started + span * interval '45 ms' END,
    CASE WHEN status = 'failed' THEN 'bitcoind rpc: timeout after 30s at block ' || cur END,
    started, done,
    (ARRAY['scheduler', 'ops@utxoiq.com', 'backfill-cli', NULL])[1 + ((h >> 4) & 3)::int],
    coalesce(done, started + ((h >> 20) & 4095) * interval '1 second'),
    sha256(convert_to('job-status:' || g, 'UTF8')), sha256(convert_to('job-first:' || g, 'UTF8')),
    CASE WHEN status = 'completed' THEN sha256(convert_to('job-done:' || g, 'UTF8')) END
FROM jobs
"""

ROWS_BYTES_SQL = "SELECT coalesce(sum(pg_table_size(relid)), 0) FROM pg_stat_user_tables"
Statement = tuple[str, str, tuple[Any, ...]]  # what (for the progress lines), SQL, arguments


def _say(text: str) -> None:
    print(f"backup: {text}", file=sys.stderr, flush=True)


async def ensure_data() -> tuple[Settings, float]:
    """The bench database, migrated to head, built if missing, too small or of another
    DATA_VERSION; its Settings and its rows' size in MB."""
    settings = scratch_settings(DATABASE)
    await upgrade(settings, registry())
    conn = await asyncpg.connect(asyncpg_dsn(settings))
    try:
        version = None
        if await conn.fetchval("SELECT to_regclass('bench_backup_marker')") is not None:
            version = await conn.fetchval("SELECT max(version) FROM bench_backup_marker")
        size_mb = int(await conn.fetchval(ROWS_BYTES_SQL)) / MIB
    finally:
        await conn.close()
    _say(f"{DATABASE}: data version {version}, {size_mb:.0f} MB of rows")
    if version == DATA_VERSION and size_mb >= MIN_ROWS_MB:
        return settings, size_mb
    await _as_admin(_drop(DATABASE))
    await upgrade(settings, registry())
    started = time.monotonic()
    size_mb = await build(settings, METRICS_PER_MONTH)
    _say(f"built {DATABASE} in {time.monotonic() - started:.0f} s: {size_mb:.0f} MB of rows")
    if size_mb < MIN_ROWS_MB:
        raise RuntimeError(f"{size_mb:.0f} MB of rows (< {MIN_ROWS_MB}): raise METRICS_PER_MONTH")
    return settings, size_mb


def _month(m: int) -> datetime:
    """The start (UTC) of the data's ``m``-th month."""
    months = FIRST_MONTH[0] * 12 + FIRST_MONTH[1] - 1 + m
    return datetime(months // 12, months % 12 + 1, 1, tzinfo=UTC)


def _fill_statements(per_month: int) -> list[Statement]:
    part = -(-per_month // PARTS_PER_MONTH)
    statements: list[Statement] = []
    for m in range(MONTHS):
        start, base = _month(m), m * per_month
        step_s = (_month(m + 1) - start).total_seconds() / per_month
        assert step_s > 1, "a sample's jitter (under 1 s) would cross into the next month"
        for first in range(base, base + per_month, part):
            last = min(first + part, base + per_month) - 1
            args = (start, first, last, step_s, base)
            statements.append((f"metrics {start:%Y-%m} {first}-{last}", METRICS_SQL, args))
    statements.append(("feedback", FEEDBACK_SQL, (_month(0), FEEDBACK_ROWS)))
    statements.append(("backfill jobs", BACKFILL_SQL, (_month(0), BACKFILL_JOBS)))
    return statements


async def build(settings: Settings, per_month: int) -> float:
    """Fill the migrated, empty database; its rows' size in MB.

    ``GENERATORS`` connections take the INSERTs from one list, without synchronous
    commit; then every table is frozen and analysed (so that no reader has hint bits
    or a visibility map to write) and a checkpoint writes it all out.
    """
    conns = [await asyncpg.connect(asyncpg_dsn(settings)) for _ in range(GENERATORS)]
    try:
        for m in range(MONTHS):
            await conns[0].execute("SELECT ensure_system_metrics_partition($1)", _month(m))
        await _run_all(conns, _fill_statements(per_month), "SET synchronous_commit = off")
        tables = await conns[0].fetch(
            "SELECT relid::regclass::text AS name FROM pg_stat_user_tables"
            " WHERE pg_table_size(relid) > 0 ORDER BY pg_table_size(relid) DESC"
        )
        vacuums = [(f"vacuum {t[0]}", f"VACUUM (FREEZE, ANALYZE) {t[0]}", ()) for t in tables]
        await _run_all(conns, vacuums)
        await conns[0].execute("CREATE TABLE bench_backup_marker (version text, built timestamptz)")
        await conns[0].execute("INSERT INTO bench_backup_marker VALUES ($1, now())", DATA_VERSION)
        size_mb = int(await conns[0].fetchval(ROWS_BYTES_SQL)) / MIB
    finally:
        for conn in conns:
            await conn.close()
    await _as_admin("CHECKPOINT")
    return size_mb


async def _run_all(conns: list[asyncpg.Connection], todo: list[Statement], setup: str = "") -> None:
    """Run ``todo`` on ``conns``, each connection taking the next statement when done."""
    pending, started = deque(todo), time.monotonic()

    async def loop(conn: asyncpg.Connection) -> None:
        if setup:
            await conn.execute(setup)
        while pending:
            what, sql, args = pending.popleft()
            await conn.execute(sql, *args)
            done = len(todo) - len(pending)
            _say(f"{done}/{len(todo)} {what} ({time.monotonic() - started:.0f} s)")

    await asyncio.gather(*(loop(conn) for conn in conns))


def dump_to_counter(dsn: str) -> tuple[int, float]:
    """``pg_dump -Fc`` into a reader that only counts: its output bytes, its wall time."""
    buffer, size, started = bytearray(MIB), 0, time.perf_counter()
    pipes: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    with subprocess.Popen(["pg_dump", "-Fc", "-d", dsn], pipesize=MIB, **pipes) as process:
        assert process.stdout is not None
        while count := os.readv(process.stdout.fileno(), [buffer]):
            size += count
        _, errors = process.communicate()
    seconds = time.perf_counter() - started
    if process.returncode:
        raise RuntimeError(f"pg_dump exited {process.returncode}: {errors.decode()[-2000:]}")
    return size, seconds


def run_tool(*args: str) -> float:
    """Run a client tool (pg_dump, pg_restore); its wall time. Fails on an error."""
    started = time.perf_counter()
    result = subprocess.run(args, capture_output=True, check=False)
    seconds = time.perf_counter() - started
    if result.returncode:
        raise RuntimeError(f"{args[0]} exited {result.returncode}: {result.stderr[-2000:]!r}")
    return seconds


async def empty_database(name: str) -> Settings:
    """Database ``name``, dropped and created empty (dropped again by cleanup), after a
    checkpoint: what earlier steps left dirty is not written during the timed part."""
    if name not in common.DATABASES:
        common.DATABASES.append(name)
    await _as_admin(_drop(name), f'CREATE DATABASE "{name}"', "CHECKPOINT")
    return scratch_settings(name)


async def measure_baselines(settings: Settings, directory: Path) -> tuple[float, float]:
    """``pg_dump`` into a counter, then ``pg_restore`` of a local file: their MB/s."""
    dsn, dump_file = asyncpg_dsn(settings), directory / "baseline.dump"
    seconds = await asyncio.to_thread(run_tool, "pg_dump", "-Fc", "-f", str(dump_file), "-d", dsn)
    file_bytes = dump_file.stat().st_size
    _say(f"pg_dump -Fc -f (untimed): {file_bytes / MIB:.0f} MB in {seconds:.1f} s")
    await _as_admin("CHECKPOINT")
    dump_bytes, dump_s = await asyncio.to_thread(dump_to_counter, dsn)
    _say(f"pg_dump -Fc to a counter: {dump_bytes / MIB:.0f} MB in {dump_s:.1f} s")
    target = asyncpg_dsn(await empty_database(f"{DATABASE}_pg_restore"))
    restore = [f"--jobs={JOBS}", "--exit-on-error", "-d", target, str(dump_file)]
    seconds = await asyncio.to_thread(run_tool, "pg_restore", *restore)
    _say(f"pg_restore -j {JOBS}: {file_bytes / MIB:.0f} MB in {seconds:.1f} s")
    await _as_admin(_drop(f"{DATABASE}_pg_restore"))
    return dump_bytes / MIB / dump_s, file_bytes / MIB / seconds


@dataclass(frozen=True)
class WorkerRun:
    """A finished ``utxoiq-worker`` command: its log events by message, its peak RSS."""

    events: dict[str, dict[str, Any]]
    peak_rss_mb: float
    tail: str

    def event(self, message: str) -> dict[str, Any]:
        if message not in self.events:
            raise RuntimeError(f"no {message!r} event logged; stderr's tail:\n{self.tail}")
        return self.events[message]

    def rate(self, message: str) -> float:
        event = self.event(message)
        return float(event["size_bytes"]) / MIB / float(event["seconds"])


def run_worker(env: dict[str, str], *args: str) -> WorkerRun:
    """``python -m worker ARGS`` to its end; fails with stderr's tail on an error.
    ``ru_maxrss`` of ``os.wait4`` covers it and the children it waited for."""
    command = [sys.executable, "-m", "worker", *args]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    events: dict[str, dict[str, Any]] = {}
    tail: deque[str] = deque(maxlen=40)

    def watch() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            tail.append(line.decode("utf-8", "replace"))
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and isinstance(entry.get("message"), str):
                    events[entry["message"]] = entry

    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    _, status, usage = os.wait4(process.pid, 0)  # ru_maxrss in KiB
    process.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    run = WorkerRun(events, usage.ru_maxrss / 1024, "".join(tail))
    if process.returncode:
        raise RuntimeError(f"{' '.join(command[1:])} exited {process.returncode}:\n{run.tail}")
    return run


async def measure_worker(settings: Settings, store: Path) -> tuple[WorkerRun, WorkerRun]:
    """``backup run`` into ``store``, then ``backup restore --latest`` from it."""
    env = {**os.environ, "DATABASE_URL": settings.database_url, "LOG_LEVEL": "INFO"}
    env["BACKUP_URL"] = store.as_uri()
    await _as_admin("CHECKPOINT")
    backup = await asyncio.to_thread(run_worker, env, "backup", "run")
    _say(f"backup run: {backup.rate('backup dumped'):.1f} MB/s, {backup.peak_rss_mb:.0f} MB RSS")
    target = (await empty_database(f"{DATABASE}_worker_restore")).database_url
    restore_args = ["backup", "restore", "--latest", "--to", target, "--jobs", str(JOBS)]
    restore = await asyncio.to_thread(run_worker, env, *restore_args)
    await _as_admin(_drop(f"{DATABASE}_worker_restore"))
    return backup, restore


async def run(baselines_only: bool = False) -> None:
    settings, size_mb = await ensure_data()
    report(SCENARIO, "database_mb", size_mb)
    with tempfile.TemporaryDirectory(prefix="utxoiq-bench-backup-") as directory:
        dump, restore = await measure_baselines(settings, Path(directory))
        if baselines_only:
            report(SCENARIO, "pg_dump_devnull_mb_per_s", dump)
            report(SCENARIO, "pg_restore_local_mb_per_s", restore)
            return
        worker, restored = await measure_worker(settings, Path(directory) / "store")
    rate = worker.rate("backup dumped")
    report(SCENARIO, "backup_mb_per_s", rate, "pg_dump_devnull_mb_per_s", dump)
    if "backup verified" in worker.events:
        report(SCENARIO, "verify_s", float(worker.event("backup verified")["seconds"]))
    report(SCENARIO, "peak_rss_mb", worker.peak_rss_mb)
    rate = restored.rate("backup restored")
    report(SCENARIO, "restore_mb_per_s", rate, "pg_restore_local_mb_per_s", restore)


async def _baselines_only() -> None:
    try:
        await run(baselines_only=True)
    finally:
        await common.drop_databases()


if __name__ == "__main__":
    if sys.argv[1:] != ["--baselines-only"]:
        raise SystemExit("usage: python -m bench.backup --baselines-only")
    run_async(_baselines_only())
