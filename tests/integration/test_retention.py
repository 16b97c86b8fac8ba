"""Retention against real parts (issue 17): PostgreSQL, ``file://`` and Cloud Storage
(fake-gcs-server). Windows to the second, whole months dropped, the partial month
deleted, dry runs, archive round trips, interrupted runs' objects swept."""

from __future__ import annotations

import gzip
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine

from handlers.maintenance_runs import RunKey
from handlers.retention import restore
from handlers.retention.tables import BACKFILL, FEEDBACK, METRICS, TABLES
from handlers.retention.task import dry_run, run_retention
from tests.conftest import url_for
from tests.support.object_stores import drop_bucket, fresh_bucket_store
from worker.config import Settings
from worker.pipeline.crash_points import CrashPoints
from worker.storage import inventory
from worker.storage.objects import open_store

NOW = datetime.now(UTC).replace(microsecond=0)
ROW_TEXT = "SELECT t::text AS row FROM {} t WHERE id = $1"
SECOND = timedelta(seconds=1)


def _settings(settings: Settings, archive_url: str) -> Settings:
    import dataclasses

    return dataclasses.replace(settings, archive_url=archive_url)


async def _noted(objects: list[dict[str, Any]]) -> None:
    return None


async def _retain(settings: Settings, task: str = "retention") -> dict[str, int]:
    result = await run_retention(
        settings,
        RunKey(task, NOW.date()),
        1,
        note=_noted,
        crash_points=CrashPoints.disarmed(),
        now=NOW,
    )
    return result.row_counts


@pytest_asyncio.fixture(loop_scope="session", params=["file", "gcs"])
async def archive_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "file":
        yield f"file://{tmp_path}/archive"
        return
    store = await fresh_bucket_store("archive")
    yield store.url
    await drop_bucket(store)


async def _execute(database_url: str, *statements: str, args: tuple[Any, ...] = ()) -> None:
    async with inventory.connect(database_url) as conn:
        for sql in statements:
            await conn.execute(sql, *args)


async def _ids(database_url: str, table: str) -> set[str]:
    async with inventory.connect(database_url) as conn:
        return {str(r["id"]) for r in await conn.fetch(f"SELECT id FROM {table}")}


async def _seed_edges(database_url: str, margin: timedelta = SECOND) -> dict[str, dict[str, str]]:
    """For each table, a row ``margin`` past its window and one ``margin`` inside."""
    edges: dict[str, dict[str, str]] = {}
    metric_cut = NOW - timedelta(days=90)
    feedback_cut = NOW - timedelta(days=730)
    job_cut = NOW - timedelta(days=180)
    async with inventory.connect(database_url) as conn:
        await conn.execute("SELECT ensure_system_metrics_partition($1)", metric_cut - margin)
        await conn.execute("SELECT ensure_system_metrics_partition($1)", metric_cut + margin)
        for name, at in (("out", metric_cut - margin), ("in", metric_cut + margin)):
            row_id = uuid.uuid4()
            await conn.execute(
                "INSERT INTO system_metrics (id, service_name, metric_type, metric_value, unit,"
                " \"timestamp\", metadata) VALUES ($1, 'svc', 'cpu', 1.5, 'percent', $2,"
                ' \'{"k": "v\\\\n"}\')',
                row_id,
                at,
            )
            await conn.execute(
                'INSERT INTO system_metric_ids (id, "timestamp") VALUES ($1, $2)', row_id, at
            )
            edges.setdefault(METRICS.name, {})[name] = str(row_id)
        for name, at in (("out", feedback_cut - margin), ("in", feedback_cut + margin)):
            row_id = uuid.uuid4()
            await conn.execute(
                "INSERT INTO insight_feedback (id, insight_id, user_id, rating, created_at,"
                " updated_at, event_key) VALUES ($1, $2, 'u', 4, $3, $3, '\\x01'::bytea)",
                row_id,
                f"insight-{name}",
                at,
            )
            edges.setdefault(FEEDBACK.name, {})[name] = str(row_id)
        for name, status, at in (
            ("out", "completed", job_cut - margin),
            ("in", "failed", job_cut + margin),
            ("running", "running", job_cut - timedelta(days=300)),
            ("paused", "paused", job_cut - timedelta(days=300)),
        ):
            row_id = uuid.uuid4()
            await conn.execute(
                "INSERT INTO backfill_jobs (id, job_type, start_block, end_block, current_block,"
                " status, progress_percentage, started_at, status_event_at, status_event_key,"
                " first_event_key) VALUES ($1, 'blocks', 0, 10, 5, $2, 50, $3, $3,"
                " '\\x02'::bytea, '\\x02'::bytea)",
                row_id,
                status,
                at,
            )
            edges.setdefault(BACKFILL.name, {})[name] = str(row_id)
    return edges


async def _archived_ids(archive_url: str) -> dict[str, list[str]]:
    store = open_store(archive_url)
    found: dict[str, list[str]] = {}
    try:
        for table in TABLES:
            for info in await store.list(f"{table}/"):
                if info.key.endswith(".jsonl.gz"):
                    lines = gzip.decompress(await store.read_bytes(info.key)).splitlines()
                    ids = [
                        json.loads(line).get("id") or json.loads(line)["job_id"] for line in lines
                    ]
                    found.setdefault(table, []).extend(ids)
    finally:
        store.close()
    return found


async def test_each_window_to_the_second_and_running_jobs_kept(
    settings: Settings, archive_url: str
) -> None:
    edges = await _seed_edges(settings.database_url)
    config = _settings(settings, archive_url)
    counts = await _retain(config)
    assert counts == {METRICS.name: 1, FEEDBACK.name: 1, BACKFILL.name: 1}
    archived = await _archived_ids(archive_url)
    for table, rows in edges.items():
        present = await _ids(settings.database_url, table)
        assert archived[table] == [rows["out"]], table
        assert rows["out"] not in present
        assert {v for k, v in rows.items() if k != "out"} <= present, table
    identities = await _ids(settings.database_url, "system_metric_ids")
    assert edges[METRICS.name]["out"] not in identities
    assert edges[METRICS.name]["in"] in identities
    again = await run_retention(
        config,
        RunKey("retention", NOW.date()),
        2,
        note=_noted,
        crash_points=CrashPoints.disarmed(),
        now=NOW,
    )
    assert again.details["this_attempt"] == {}  # nothing left: nothing written twice
    assert again.row_counts == counts  # the day's run: every attempt's rows
    assert sum(len(v) for v in (await _archived_ids(archive_url)).values()) == 3


async def test_a_whole_month_is_dropped_and_the_partial_month_deleted(
    settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    cut = NOW - timedelta(days=90)
    old_month = (cut.replace(day=1) - timedelta(days=40)).replace(day=10)
    await _execute(
        settings.database_url,
        "SELECT ensure_system_metrics_partition($1)",
        args=(old_month,),
    )
    await _execute(
        settings.database_url,
        "SELECT ensure_system_metrics_partition($1::timestamptz - interval '2 days')",
        args=(cut,),
    )
    await _execute(
        settings.database_url,
        "INSERT INTO system_metrics (id, service_name, metric_type, metric_value, unit,"
        " \"timestamp\") SELECT gen_random_uuid(), 'svc', 'cpu', g, 'percent',"
        " $1::timestamptz + make_interval(mins => g) FROM generate_series(1, 25000) g",
        args=(old_month,),
    )
    await _execute(
        settings.database_url,
        "INSERT INTO system_metrics (id, service_name, metric_type, metric_value, unit,"
        " \"timestamp\") SELECT gen_random_uuid(), 'svc', 'cpu', g, 'percent',"
        " $1::timestamptz - make_interval(secs => g) FROM generate_series(1, 100) g",
        args=(cut,),
    )
    partition = f"system_metrics_y{old_month:%Y}m{old_month:%m}"
    counts = await _retain(_settings(settings, f"file://{tmp_path}"))
    assert counts == {METRICS.name: 25100}
    async with inventory.connect(settings.database_url) as conn:
        assert await conn.fetchval("SELECT to_regclass($1)", partition) is None
        assert (
            await conn.fetchval('SELECT count(*) FROM system_metrics WHERE "timestamp" < $1', cut)
            == 0
        )
    archived = await _archived_ids(f"file://{tmp_path}")
    assert len(archived[METRICS.name]) == len(set(archived[METRICS.name])) == 25100


async def test_a_dry_run_counts_by_month_and_changes_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    edges = await _seed_edges(settings.database_url)
    config = _settings(settings, f"file://{tmp_path}")
    counts = await dry_run(config, list(TABLES.values()), now=NOW)
    assert {t: sum(m.values()) for t, m in counts.items()} == {
        METRICS.name: 1,
        FEEDBACK.name: 1,
        BACKFILL.name: 1,
    }
    for table, rows in edges.items():
        assert set(rows.values()) <= await _ids(settings.database_url, table)
    assert not (tmp_path / METRICS.name).exists()


async def test_archive_restore_round_trip_is_idempotent(settings: Settings, tmp_path: Path) -> None:
    edges = await _seed_edges(settings.database_url)
    async with inventory.connect(settings.database_url) as conn:
        before = {
            t: await conn.fetchrow(
                f"SELECT t::text AS row FROM {t} t WHERE id = $1", uuid.UUID(r["out"])
            )
            for t, r in edges.items()
        }
    config = _settings(settings, f"file://{tmp_path}")
    await _retain(config)
    target = url_for(f"utxoiq_test_archive_{uuid.uuid4().hex[:10]}", settings)
    store = open_store(config.archive_url)
    start, end = NOW - timedelta(days=3650), NOW
    try:
        for spec in TABLES.values():
            assert await restore.restore_archive(config, store, spec, start, end, target) == (1, 1)
            assert await restore.restore_archive(config, store, spec, start, end, target) == (1, 0)
        async with inventory.connect(target) as conn:
            for table, row in before.items():
                restored = await conn.fetchrow(
                    f"SELECT t::text AS row FROM {table} t WHERE id = $1",
                    uuid.UUID(edges[table]["out"]),
                )
                assert restored is not None and restored["row"] == row["row"], table
    finally:
        await inventory.drop_database(target, inventory.database_name(target))


async def test_objects_of_an_interrupted_run_are_swept_before_the_next(
    settings: Settings, tmp_path: Path
) -> None:
    store = open_store(f"file://{tmp_path}")
    stray = "insight_feedback/2020/01/insight_feedback-20200101T000000000000Z_aaaaaaaa-x.jsonl.gz"
    await store.write_bytes(stray, b"rows still in their table")
    await store.write_bytes(stray + ".json", b"{}")
    result = await run_retention(
        _settings(settings, f"file://{tmp_path}"),
        RunKey("retention", NOW.date()),
        1,
        note=_noted,
        crash_points=CrashPoints.disarmed(),
        now=NOW,
    )
    assert result.details["unrecorded_objects_removed"] == 2
    assert await store.list() == []
