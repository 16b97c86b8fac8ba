"""Backups against real parts (issue 16): PostgreSQL, pg_dump and pg_restore, a
``file://`` store and Cloud Storage (fake-gcs-server, started by the test stack)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine

from handlers.backups import catalog, prune, restore, verify
from handlers.maintenance_runs import RunKey
from schemas.backups import BackupManifest, Verification, render_manifest
from tests.conftest import url_for
from tests.support.backups import (
    TODAY,
    backup_now,
    backup_settings,
    checksums,
    descendants,
    seed,
    slow_tools,
)
from tests.support.object_stores import drop_bucket, fresh_bucket_store
from worker.config import Settings
from worker.exceptions import MaintenanceError
from worker.progress import Progress
from worker.storage import inventory
from worker.storage.migrate import head_revision
from worker.storage.objects import ObjectStore, open_store


@pytest_asyncio.fixture(loop_scope="session", params=["file", "gcs"])
async def backup_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "file":
        yield f"file://{tmp_path}/backups"
        return
    store = await fresh_bucket_store("backups")
    yield store.url
    await drop_bucket(store)


@pytest_asyncio.fixture(loop_scope="session")
async def scratch_url(settings: Settings) -> AsyncIterator[str]:
    """A database name of the test's own on the same server, dropped afterwards."""
    url = url_for(f"utxoiq_test_restore_{uuid.uuid4().hex[:10]}", settings)
    yield url
    await inventory.drop_database(url, inventory.database_name(url))


def _without_ledger(sums: dict[str, tuple[int, str]]) -> dict[str, tuple[int, str]]:
    # The dump's snapshot holds its own run as 'running'; the live ledger moved on.
    return {table: value for table, value in sums.items() if table != "maintenance_runs"}


async def _only_backup(store: ObjectStore, settings: Settings) -> catalog.Backup:
    backups = await catalog.list_backups(store, inventory.database_name(settings.database_url))
    assert len(backups) == 1, backups
    return backups[0]


async def test_round_trip_backup_drop_restore_every_table_equal(
    settings: Settings, engine: AsyncEngine, backup_url: str, scratch_url: str
) -> None:
    await seed(settings.database_url)
    config = backup_settings(settings, backup_url)
    outcome = await backup_now(engine, config)
    assert outcome.ran and outcome.record.status == "succeeded"
    before = _without_ledger(await checksums(settings.database_url))
    assert sum(n for n, _ in before.values()) > 6000
    assert len([t for t in before if t.startswith("system_metrics_y")]) >= 3

    store = open_store(backup_url)
    backup = await _only_backup(store, config)
    assert backup.verified and backup.manifest is not None
    assert backup.manifest.rows == outcome.record.row_counts
    assert backup.manifest.alembic_revision == head_revision()
    await engine.dispose()
    await inventory.drop_database(
        settings.database_url, inventory.database_name(settings.database_url)
    )

    done = await restore.restore(config, store, backup, scratch_url, clean=False, jobs=2)
    assert _without_ledger(await checksums(scratch_url)) == before
    assert done.rows == backup.manifest.rows


async def test_restore_streams_with_one_job_and_refuses_a_non_empty_target(
    settings: Settings, engine: AsyncEngine, tmp_path: Path, scratch_url: str
) -> None:
    await seed(settings.database_url, rows=500)
    config = backup_settings(settings, f"file://{tmp_path}")
    await backup_now(engine, config)
    store = open_store(config.backup_url)
    backup = await _only_backup(store, config)
    await restore.restore(config, store, backup, scratch_url, clean=False, jobs=1)
    with pytest.raises(MaintenanceError, match=r"not empty .* pass --clean"):
        await restore.restore(config, store, backup, scratch_url, clean=False, jobs=1)
    again = await restore.restore(config, store, backup, scratch_url, clean=True, jobs=2)
    assert again.rows == backup.manifest.rows  # type: ignore[union-attr]


async def _expected(backup: catalog.Backup) -> verify.Expected:
    manifest = backup.manifest
    assert manifest is not None
    return verify.Expected(backup.key, manifest.sha256, manifest.size_bytes, manifest.rows)


async def test_truncated_or_corrupted_object_fails_verify_clearly(
    settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    await seed(settings.database_url, rows=2000)
    config = backup_settings(settings, f"file://{tmp_path}")
    await backup_now(engine, config)
    store = open_store(config.backup_url)
    backup = await _only_backup(store, config)
    expected = await _expected(backup)
    path = tmp_path / backup.key
    whole = path.read_bytes()
    await verify.verify(config, store, expected, Progress("verify"))  # intact: passes

    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(MaintenanceError, match="truncated"):
        await verify.verify(config, store, expected, Progress("verify"))
    # Even told the truncated size, the restore itself finds the dump cut short
    # (where `pg_restore --list` would pass).
    short = dataclasses.replace(expected, size_bytes=len(whole) // 2)
    with pytest.raises(MaintenanceError, match="the restore failed"):
        await verify.verify(config, store, short, Progress("verify"))

    middle = len(whole) // 2
    path.write_bytes(
        whole[:middle] + bytes(b ^ 0xFF for b in whole[middle : middle + 64]) + whole[middle + 64 :]
    )
    with pytest.raises(MaintenanceError, match=r"restore failed|sha256 is"):
        await verify.verify(config, store, expected, Progress("verify"))
    leftovers = await inventory.databases_like(config.database_url, "utxoiq_test_")
    assert not [name for name in leftovers if verify.SCRATCH_MARK in name]


async def test_pg_dump_killed_midway_leaves_no_backup_and_the_run_is_retried(
    settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    await seed(settings.database_url, rows=2000)
    slow = backup_settings(
        settings, f"file://{tmp_path}/store", pg_bin_dir=str(slow_tools(tmp_path / "bin", 3))
    )
    run = asyncio.create_task(backup_now(engine, slow))
    real: list[int] = []
    for _ in range(100):
        dumps = descendants(os.getpid(), "pg_dump")
        # The wrapper script and the real pg_dump below it share the name: the real one
        # is the deeper of the two.
        real = [pid for pid in dumps if any(p in dumps for p in _parents(pid))]
        if real:
            break
        await asyncio.sleep(0.05)
    assert real, "pg_dump never started"
    os.kill(real[0], signal.SIGKILL)
    with pytest.raises(MaintenanceError, match=r"pg_dump (exited|was killed)"):
        await run
    store = open_store(slow.backup_url)
    assert await store.list() == []  # nothing visible, not even an incomplete dump
    record = await _ledger_record(engine, slow)
    assert (record.status, record.attempt) == ("failed", 1)

    retried = await backup_now(engine, dataclasses.replace(slow, pg_bin_dir=None))
    assert retried.ran and retried.record.attempt == 2
    assert (await _only_backup(store, slow)).verified


def _parents(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat[stat.rindex(")") + 2 :].split()[1])
        chain.append(pid)
    return chain


async def _ledger_record(engine: AsyncEngine, settings: Settings):  # type: ignore[no-untyped-def]
    from handlers.maintenance import ledger

    record = await ledger(engine, settings).read(RunKey("backup", TODAY))
    assert record is not None
    return record


async def test_an_older_pg_dump_than_the_server_is_refused_before_dumping(
    settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    tools = tmp_path / "old"
    tools.mkdir()
    (tools / "pg_dump").write_text("#!/bin/sh\necho 'pg_dump (PostgreSQL) 14.11'\n")
    (tools / "pg_dump").chmod(0o755)
    config = backup_settings(settings, f"file://{tmp_path}/store", pg_bin_dir=str(tools))
    with pytest.raises(MaintenanceError, match=r"PostgreSQL 14 but the server is 1[5-9]"):
        await backup_now(engine, config)
    assert not (tmp_path / "store").exists() or await open_store(config.backup_url).list() == []


async def test_two_concurrent_requests_for_the_same_day_make_one_backup(
    settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    await seed(settings.database_url, rows=500)
    # Slow enough that the second request surely meets the first one in progress.
    config = backup_settings(
        settings, f"file://{tmp_path}/store", pg_bin_dir=str(slow_tools(tmp_path / "bin", 1.5))
    )
    first, second = await asyncio.gather(backup_now(engine, config), backup_now(engine, config))
    assert sorted([first.ran, second.ran]) == [False, True]
    assert first.record.objects == second.record.objects
    third = await backup_now(engine, config)
    assert not third.ran and third.record.attempt == 1
    await _only_backup(open_store(config.backup_url), config)


async def test_prune_over_a_simulated_fortnight_on_a_real_store(tmp_path: Path) -> None:
    """Daily backups (one of them unverified, one left without manifest by a dead run)
    and a prune after each: the store holds exactly the last seven days' complete
    backups, and a leftover only while it is younger than a day."""
    store = open_store(f"file://{tmp_path}")
    start = datetime(2026, 11, 1, 3, 0, tzinfo=UTC)
    for day in range(14):
        taken = start + timedelta(days=day)
        key = catalog.dump_key("db", taken)
        await store.write_bytes(key, b"dump")
        if day != 9:  # day 9's run died before its manifest
            manifest = _manifest(store.uri(key), taken, verified=day != 12)
            await store.write_bytes(catalog.manifest_key(key), render_manifest(manifest))
        now = taken + timedelta(hours=1)
        await prune.prune(store, "db", now, retention_days=7)
        kept = await catalog.list_backups(store, "db")
        expected = {d for d in range(max(0, day - 6), day + 1) if d != 9 or day == 9}
        assert {(b.taken_at - start).days for b in kept} == expected, day
        assert all(b.complete for b in kept if b.taken_at < now - timedelta(days=1))


def _manifest(uri: str, taken: datetime, *, verified: bool) -> BackupManifest:
    return BackupManifest(
        object=uri,
        database="db",
        sha256="0" * 64,
        size_bytes=4,
        server_version="15",
        pg_dump_major=15,
        alembic_revision="0002",
        rows={},
        started_at=taken,
        finished_at=taken,
        verification=Verification(passed=verified, checked_at=taken, seconds=0.1),
    )
