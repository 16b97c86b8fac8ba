"""Backup rules that need no server: names, versions, the run's day, what prune keeps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from handlers.backups.catalog import Backup, dump_key, taken_at
from handlers.backups.prune import plan
from handlers.maintenance import MaintenanceHandler
from handlers.maintenance_runs import RunKey
from schemas.backups import BackupManifest, Verification
from worker.config import Settings
from worker.exceptions import MaintenanceError, SchemaViolationError
from worker.pipeline.crash_points import CrashPoints
from worker.storage.objects import ObjectInfo
from worker.storage.postgres_tools import Connection, parse_major, require_dump_compatible


def test_dump_names_follow_the_contract() -> None:
    moment = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    key = dump_key("utxoiq", moment)
    assert key == "utxoiq/2026/03/04/utxoiq-20260304T050607Z.dump"
    assert taken_at(key) == moment and taken_at(key + ".json") == moment
    assert taken_at("utxoiq/notes.txt") is None


def test_pg_dump_versions_are_read_and_an_older_client_is_refused() -> None:
    assert parse_major(b"pg_dump (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)\n") == 15
    assert parse_major(b"pg_dump (PostgreSQL) 17beta1") == 17
    with pytest.raises(MaintenanceError, match="cannot read"):
        parse_major(b"command not found")
    require_dump_compatible(16, 150004, "pg_dump")  # newer client: fine
    with pytest.raises(MaintenanceError, match="PostgreSQL 15 but the server is 16"):
        require_dump_compatible(15, 160001, "/usr/bin/pg_dump")


def test_passwords_never_reach_the_command_line() -> None:
    target = Connection.from_database_url(
        "postgresql+asyncpg://u:s3cret@db:5433/utxoiq?ssl=require&prepared_statement_cache_size=0"
    )
    assert "s3cret" not in target.url
    assert target.url == "postgresql://u@db:5433/utxoiq?sslmode=require"
    socket = Connection.from_database_url("postgresql+asyncpg://u@/utxoiq?host=/cloudsql/p:r:i")
    assert socket.url == "postgresql://u@/utxoiq?host=%2Fcloudsql%2Fp%3Ar%3Ai"
    assert target.environment()["PGPASSWORD"] == "s3cret"
    assert target.with_database("other").url == "postgresql://u@db:5433/other?sslmode=require"


@pytest.mark.parametrize(
    ("payload", "published", "day"),
    [
        ({"task": "backup"}, "2026-11-27T23:59:59+00:00", "2026-11-27"),
        ({"task": "backup"}, "2026-11-27T23:30:00-05:00", "2026-11-28"),
        ({"task": "backup", "scheduled_for": "2026-11-26T01:00:00+02:00"}, None, "2026-11-25"),
    ],
)
def test_a_run_is_the_task_and_the_utc_day(
    payload: dict[str, object], published: str | None, day: str
) -> None:
    handler = MaintenanceHandler(Settings(), CrashPoints.disarmed())
    at = datetime.fromisoformat(published or "2030-01-01T12:00:00+00:00")
    order = handler.parse(payload, at)
    assert order.run == RunKey("backup", datetime.fromisoformat(day).date())


def test_unknown_tasks_are_refused_and_dry_runs_kept_apart() -> None:
    handler = MaintenanceHandler(Settings(), CrashPoints.disarmed())
    now = datetime.now(UTC)
    with pytest.raises(SchemaViolationError, match="task"):
        handler.parse({"task": "vacuum"}, now)
    order = handler.parse({"task": "retention", "dry_run": True}, now)
    assert order.dry_run and order.run == RunKey("retention", now.date())


def test_the_stale_time_must_exceed_two_heartbeats() -> None:
    with pytest.raises(ValueError, match="MAINTENANCE_STALE_AFTER"):
        Settings(maintenance_heartbeat_s=10, maintenance_stale_s=15)


def _backup(moment: datetime, *, manifest: bool = True, verified: bool = True) -> Backup:
    key = dump_key("db", moment)
    described = BackupManifest(
        object=f"file:///b/{key}",
        database="db",
        sha256="0" * 64,
        size_bytes=1,
        server_version="15",
        pg_dump_major=15,
        alembic_revision="0002",
        rows={},
        started_at=moment,
        finished_at=moment,
        verification=Verification(passed=verified, checked_at=moment, seconds=1.0),
    )
    return Backup(
        key,
        moment,
        ObjectInfo(key, 1, moment),
        described if manifest else None,
        manifest_present=manifest,
    )


def test_prune_over_a_simulated_fortnight_keeps_exactly_the_window() -> None:
    start = datetime(2026, 11, 1, 3, 0, tzinfo=UTC)
    held: list[Backup] = []
    for day in range(14):
        now = start + timedelta(days=day, minutes=5)
        held.append(_backup(start + timedelta(days=day)))
        doomed = {d.backup.key for d in plan(held, now, retention_days=7)}
        held = [b for b in held if b.key not in doomed]
        ages = sorted((now - b.taken_at).days for b in held)
        assert ages == list(range(min(day, 6) + 1)), (day, ages)  # the last 7 days


def test_prune_never_deletes_the_newest_verified_backup_nor_young_leftovers() -> None:
    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    old_verified = _backup(now - timedelta(days=30))
    failed = _backup(now - timedelta(days=2), verified=False)
    in_progress = _backup(now - timedelta(hours=2), manifest=False)
    dead_leftover = _backup(now - timedelta(days=3), manifest=False)
    doomed = plan([old_verified, dead_leftover, failed, in_progress], now, retention_days=1)
    assert {d.backup.key: d.why for d in doomed} == {
        dead_leftover.key: "incomplete, older than a day",
        failed.key: "older than 1 days",
    }
