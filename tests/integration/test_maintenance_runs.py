"""The maintenance run ledger (issue 16) on the real database, and the maintenance
topic end to end: by pull and by push, duplicates give one run."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from handlers.backups import catalog
from handlers.maintenance_runs import Ledger, RunKey, RunLost, RunResult, run_once
from tests.support.backups import TODAY, backup_settings, scheduled_now, seed, slow_tools
from tests.support.emulator import publish, running_worker, wait_for
from tests.support.push import app_client, encoded, envelope
from tests.support.topics import REGISTRY
from worker.config import Settings
from worker.exceptions import MaintenanceError
from worker.http.services import Services
from worker.pubsub.client import PubSub
from worker.storage import inventory
from worker.storage.objects import open_store

KEY = RunKey("backup", TODAY)


def _ledger(engine: AsyncEngine, owner: str) -> Ledger:
    return Ledger(engine, heartbeat_s=0.2, stale_s=1.0, owner=owner)


async def test_a_run_that_succeeded_is_a_no_op_for_later_requests(engine: AsyncEngine) -> None:
    calls: list[int] = []

    async def work(attempt: int) -> RunResult:
        calls.append(attempt)
        return RunResult(row_counts={"t": 3})

    first = await run_once(_ledger(engine, "a"), KEY, work)
    second = await run_once(_ledger(engine, "b"), KEY, work)
    assert (first.ran, second.ran, calls) == (True, False, [1])
    assert second.record.row_counts == {"t": 3} and second.record.status == "succeeded"


async def test_a_waiter_settles_as_the_run_in_progress_does(engine: AsyncEngine) -> None:
    release = asyncio.Event()

    async def failing(attempt: int) -> RunResult:
        await release.wait()
        raise MaintenanceError("disk full")

    owner = asyncio.create_task(run_once(_ledger(engine, "a"), KEY, failing))
    await asyncio.sleep(0.3)
    waiter = asyncio.create_task(run_once(_ledger(engine, "b"), KEY, failing))
    await asyncio.sleep(0.6)  # past several heartbeats: still waiting, not started
    assert not waiter.done()
    release.set()
    with pytest.raises(MaintenanceError, match="disk full"):
        await owner
    with pytest.raises(MaintenanceError, match="failed in attempt 1: disk full"):
        await waiter

    async def succeeding(attempt: int) -> RunResult:
        return RunResult()

    retried = await run_once(_ledger(engine, "c"), KEY, succeeding)
    assert retried.ran and retried.record.attempt == 2


async def test_a_dead_owner_is_taken_over_once_its_heartbeat_is_stale(engine: AsyncEngine) -> None:
    dead = _ledger(engine, "dead")
    assert await dead.claim(KEY) == 1  # claimed, then never a heartbeat: the owner died
    started = asyncio.get_running_loop().time()

    async def work(attempt: int) -> RunResult:
        return RunResult(details={"attempt": attempt})

    outcome = await run_once(_ledger(engine, "next"), KEY, work)
    assert outcome.ran and outcome.record.attempt == 2 and outcome.record.owner == "next"
    assert asyncio.get_running_loop().time() - started >= 0.9  # only once stale
    assert not await dead.heartbeat(KEY, 1)  # the dead owner, if it wakes, has lost it


async def test_an_owner_that_loses_its_run_stops_working(engine: AsyncEngine) -> None:
    cancelled = asyncio.Event()

    async def endless(attempt: int) -> RunResult:
        try:
            await asyncio.sleep(60)
        finally:
            cancelled.set()
        return RunResult()

    running = asyncio.create_task(run_once(_ledger(engine, "a"), KEY, endless))
    await asyncio.sleep(0.3)
    async with engine.begin() as conn:  # another worker took it over meanwhile
        await conn.execute(text("UPDATE maintenance_runs SET attempt = 2, owner = 'b'"))
    with pytest.raises(RunLost, match="taken over"):
        await running
    assert cancelled.is_set()


async def test_published_twice_by_pull_gives_one_backup(
    pubsub_settings: Settings, pubsub: PubSub, engine: AsyncEngine, tmp_path: Path
) -> None:
    await seed(pubsub_settings.database_url, rows=300)
    config = backup_settings(pubsub_settings, f"file://{tmp_path}")
    scheduled_for, run = scheduled_now()
    request = {"task": "backup", "scheduled_for": scheduled_for}
    async with running_worker(config, topics=["maintenance"]):
        await publish(pubsub, "maintenance", [request, request])
        ledger = _ledger(engine, "test")

        async def succeeded() -> bool:
            record = await ledger.read(run)
            return record is not None and record.status == "succeeded"

        await wait_for(succeeded, lambda done: done, timeout_s=60, what="the backup run")
        await asyncio.sleep(1)  # the duplicate settles too
    backups = await catalog.list_backups(
        open_store(config.backup_url), inventory.database_name(config.database_url)
    )
    assert len(backups) == 1 and backups[0].verified
    record = await ledger.read(run)
    assert record is not None and record.attempt == 1


async def test_pushed_twice_at_once_gives_one_backup_and_holds_both_requests(
    pubsub_settings: Settings, tmp_path: Path
) -> None:
    await seed(pubsub_settings.database_url, rows=300)
    config = backup_settings(
        pubsub_settings, f"file://{tmp_path}/store", pg_bin_dir=str(slow_tools(tmp_path / "bin", 1))
    )
    yesterday = (datetime.now(UTC) - timedelta(days=1)).isoformat().replace("+00:00", "Z")
    body = encoded(
        envelope(
            {"task": "backup", "scheduled_for": yesterday},
            subscription="projects/test/subscriptions/maintenance-worker",
        )
    )
    services = Services.create(config, REGISTRY)
    async with app_client(config, services) as http:
        answers = await asyncio.gather(
            *(
                http.post(
                    "/push/maintenance", content=body, headers={"content-type": "application/json"}
                )
                for _ in range(2)
            )
        )
        # Held until the run ended: by the time either answers, the backup is complete.
        backups = await catalog.list_backups(
            open_store(config.backup_url), inventory.database_name(config.database_url)
        )
    assert [a.status_code for a in answers] == [204, 204]
    assert len(backups) == 1 and backups[0].verified
