"""Backups through the real CLI (issue 16): a worker SIGKILLed mid-backup is taken over
by the next delivery; ``backup run|list|verify|restore|prune`` as an operator runs them."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from functools import partial
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from handlers.backups import catalog
from handlers.maintenance import ledger
from tests.acceptance.test_cli import ROOT, WorkerProcess, cli_env, run_cli
from tests.conftest import url_for
from tests.support.backups import backup_settings, checksums, scheduled_now, seed, slow_tools
from tests.support.emulator import publish, wait_for
from worker.config import Settings
from worker.pubsub.client import PubSub
from worker.pubsub.topology import ACK_DEADLINE_S
from worker.storage import inventory
from worker.storage.objects import open_store


async def _start_worker(env: dict[str, str]) -> WorkerProcess:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "run",
        "--only",
        "maintenance",
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        limit=4 * 1024 * 1024,
    )
    worker = WorkerProcess(process)
    await asyncio.wait_for(worker.started.wait(), 60)
    return worker


@pytest.mark.timeout(240)  # the wait below may outlast an ack deadline
async def test_a_worker_killed_mid_backup_is_taken_over_by_the_next_delivery(
    pubsub_settings: Settings, pubsub: PubSub, engine: AsyncEngine, tmp_path: Path
) -> None:
    await seed(pubsub_settings.database_url, rows=500)
    config = backup_settings(pubsub_settings, f"file://{tmp_path}/store")
    env = cli_env(
        config,
        BACKUP_URL=config.backup_url,
        PG_BIN_DIR=str(slow_tools(tmp_path / "bin", 4)),
        MAINTENANCE_HEARTBEAT="0.5",
        MAINTENANCE_STALE_AFTER="2",
    )
    runs = ledger(engine, config)
    scheduled_for, run = scheduled_now()
    request = {"task": "backup", "scheduled_for": scheduled_for}

    first = await _start_worker(env)
    await publish(pubsub, "maintenance", [request])
    await wait_for(
        partial(runs.read, run), lambda r: r is not None and r.status == "running", timeout_s=30
    )
    first.process.kill()  # SIGKILL, mid-dump: no failure recorded, the heartbeat stops
    await first.wait(10)

    second = await _start_worker(env)
    try:
        await publish(pubsub, "maintenance", [request])  # the next delivery of the run
        try:
            # The emulator may hand that message to a pull the killed worker left open
            # (it answers into the closed connection): it then comes again once its
            # lease runs out, after the ack deadline. Either is the next delivery.
            done = await wait_for(
                partial(runs.read, run),
                lambda r: r is not None and r.status == "succeeded",
                timeout_s=ACK_DEADLINE_S + 30,
                what="the taken-over run",
            )
        except AssertionError as timeout:
            raise AssertionError(f"{timeout}\nits worker's log:\n{second.log()}") from None
    finally:
        second.process.kill()
        await second.wait(10)
    failures = [line for line in second.lines if "run failed" in line]
    assert done is not None and done.attempt == 2, failures
    backups = await catalog.list_backups(
        open_store(config.backup_url), inventory.database_name(config.database_url)
    )
    assert [b.verified for b in backups] == [True]  # the killed attempt left nothing visible


async def test_backup_commands_as_an_operator_runs_them(settings: Settings, tmp_path: Path) -> None:
    await seed(settings.database_url, rows=800)
    env = cli_env(settings, BACKUP_URL=f"file://{tmp_path}/store", LOG_LEVEL="WARNING")
    day = scheduled_now()[1].day.isoformat()  # both runs name one day, midnight or not
    code, out = await run_cli(env, "backup", "run", "--day", day)
    assert code == 0 and "succeeded, taken now" in out, out
    code, out = await run_cli(env, "backup", "run", "--day", day)
    assert code == 0 and "already done (attempt 1)" in out, out

    code, out = await run_cli(env, "backup", "list", "--json")
    listed = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(listed) == 1 and listed[0]["verified"] is True
    assert listed[0]["rows"]["insight_feedback"] == 800
    code, out = await run_cli(env, "backup", "verify", "--object", listed[0]["object"])
    assert code == 0 and "verified" in out and "insight_feedback" in out, out

    target = url_for(f"utxoiq_test_restore_{uuid.uuid4().hex[:10]}", settings)
    try:
        code, out = await run_cli(env, "backup", "restore", "--latest", "--to", target)
        assert code == 0 and "restored" in out and "800" in out, out
        code, out = await run_cli(env, "backup", "restore", "--latest", "--to", target)
        assert code == 1  # not empty, and no --clean
        source, copy = await checksums(settings.database_url), await checksums(target)
        source.pop("maintenance_runs")
        copy.pop("maintenance_runs")
        assert copy == source
    finally:
        await inventory.drop_database(target, inventory.database_name(target))

    code, out = await run_cli(env, "backup", "prune", "--dry-run")
    assert code == 0 and "0 backup(s) would delete" in out, out
