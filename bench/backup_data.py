"""The ``backup`` benchmark's data: a database of over 2 GB of rows, built once.

Database ``utxoiq_bench_backup``, kept between runs (not a scratch one), migrated to
head and filled server-side: 12 monthly ``system_metrics`` partitions with their
``system_metric_ids``, feedback, backfill jobs; values and JSONB varied so that dumps
compress like real data. Rebuilt only when missing, when its rows (``pg_table_size``
of every user table: heap and TOAST, no index) are under 2 GB, or when
``bench_backup_marker`` holds another DATA_VERSION.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from collections import deque
from datetime import UTC, datetime
from typing import Any

import asyncpg

from bench.common import _as_admin, _drop, asyncpg_dsn, scratch_settings
from handlers import registry
from worker.config import Settings
from worker.storage.migrate import upgrade

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
            'region', (ARRAY['us-central1', 'us-east1', 'europe-west1',
                       'asia-east1'])[1 + ((h >> 48) & 3)::int],
            'pod', 'svc-' || s || '-' || to_hex((k & 1048575)::int),
            'version', '1.' || (g / 400000) % 20 || '.' || ((k >> 20) & 15),
            'block_height', 870000 + g / 150, 'trace_id', to_hex(k),
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
    CASE WHEN (h >> 8) & 3 <> 0 THEN (ARRAY['useful', 'spot on, acted on it', 'too late to matter',
        'the chart helped', 'numbers look off for this block range',
        'please add the fee breakdown'])[1 + ((h >> 10) & 255)::int % 6]
        || CASE WHEN (h >> 18) & 1 = 1 THEN ' (block ' || 870000 + g % 9000 || ')' ELSE '' END END,
    CASE WHEN (h >> 20) & 31 = 0 THEN (ARRAY['inaccurate', 'misleading', 'spam', 'other'])
        [1 + ((h >> 25) & 3)::int] END,
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
TABLES_SQL = """SELECT relid::regclass::text FROM pg_stat_user_tables WHERE pg_table_size(relid) > 0
ORDER BY relid = 'system_metric_ids'::regclass, pg_table_size(relid) DESC"""
PK_SQL = "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = $1"
VACUUM_SETUP = "SET maintenance_work_mem = '512MB'"
Statement = tuple[str, str, tuple[Any, ...]]  # what (for the progress lines), SQL, arguments


def say(text: str) -> None:
    """A progress line on stderr (stdout is for the JSON lines)."""
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
    say(f"{DATABASE}: data version {version}, {size_mb:.0f} MB of rows")
    if version == DATA_VERSION and size_mb >= MIN_ROWS_MB:
        return settings, size_mb
    await _as_admin(_drop(DATABASE))
    await upgrade(settings, registry())
    started = time.monotonic()
    size_mb = await build(settings, METRICS_PER_MONTH)
    say(f"built {DATABASE} in {time.monotonic() - started:.0f} s: {size_mb:.0f} MB of rows")
    if size_mb < MIN_ROWS_MB:
        raise RuntimeError(f"{size_mb:.0f} MB of rows (< {MIN_ROWS_MB}): raise METRICS_PER_MONTH")
    return settings, size_mb


def _month(m: int) -> datetime:
    """The start (UTC) of the data's ``m``-th month."""
    months = FIRST_MONTH[0] * 12 + FIRST_MONTH[1] - 1 + m
    return datetime(months // 12, months % 12 + 1, 1, tzinfo=UTC)


def _fill_statements(per_month: int) -> list[Statement]:
    """Feedback and jobs first, then the months in groups of ``GENERATORS``, part by
    part: each connection keeps to one partition (and its indexes) at a time."""
    part = -(-per_month // PARTS_PER_MONTH)
    statements: list[Statement] = [
        ("feedback", FEEDBACK_SQL, (_month(0), FEEDBACK_ROWS)),
        ("backfill jobs", BACKFILL_SQL, (_month(0), BACKFILL_JOBS)),
    ]
    for group, first in itertools.product(range(0, MONTHS, GENERATORS), range(0, per_month, part)):
        for m in range(group, min(group + GENERATORS, MONTHS)):
            start, base = _month(m), m * per_month
            step_s = (_month(m + 1) - start).total_seconds() / per_month
            assert step_s > 1, "a sample's jitter (under 1 s) would cross into the next month"
            rows = (base + first, base + min(first + part, per_month) - 1)
            statements.append((f"metrics rows {rows}", METRICS_SQL, (start, *rows, step_s, base)))
    return statements


async def build(settings: Settings, per_month: int) -> float:
    """Fill the migrated, empty database; its rows' size in MB. ``GENERATORS``
    connections take the INSERTs from one list, without synchronous commit, while
    ``system_metric_ids`` has no primary key (added afterwards: sorted in one pass);
    then every table is frozen and analysed (no reader has hint bits or a visibility
    map to write), and a checkpoint."""
    conns = [await asyncpg.connect(asyncpg_dsn(settings)) for _ in range(GENERATORS)]
    try:
        for m in range(MONTHS):
            await conns[0].execute("SELECT ensure_system_metrics_partition($1)", _month(m))
        pk = await conns[0].fetchval(PK_SQL, "pk_system_metric_ids")
        await conns[0].execute("ALTER TABLE system_metric_ids DROP CONSTRAINT pk_system_metric_ids")
        await _run_all(conns, _fill_statements(per_month), "SET synchronous_commit = off")
        # The primary key first; the vacuum of its table last (it waits for the key).
        add_pk = f"ALTER TABLE system_metric_ids ADD CONSTRAINT pk_system_metric_ids {pk}"
        tables = await conns[0].fetch(TABLES_SQL)
        vacuums = [(f"vacuum {t[0]}", f"VACUUM (FREEZE, ANALYZE) {t[0]}", ()) for t in tables]
        await _run_all(conns, [("primary key", add_pk, ()), *vacuums], VACUUM_SETUP)
        await conns[0].execute("CREATE TABLE bench_backup_marker (version text, built timestamptz)")
        await conns[0].execute("INSERT INTO bench_backup_marker VALUES ($1, now())", DATA_VERSION)
        size_mb = int(await conns[0].fetchval(ROWS_BYTES_SQL)) / MIB
    finally:
        for conn in conns:
            await conn.close()
    await _as_admin("CHECKPOINT")
    return size_mb


async def _run_all(conns: list[asyncpg.Connection], todo: list[Statement], setup: str) -> None:
    """``setup`` on each of ``conns``, then ``todo``: each connection takes the next one."""
    pending, started, done = deque(todo), time.monotonic(), itertools.count(1)

    async def loop(conn: asyncpg.Connection) -> None:
        await conn.execute(setup)
        while pending:
            what, sql, args = pending.popleft()
            await conn.execute(sql, *args)
            say(f"{next(done)}/{len(todo)} {what} ({time.monotonic() - started:.0f} s)")

    await asyncio.gather(*(loop(conn) for conn in conns))
