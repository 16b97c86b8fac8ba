"""Retention through the real CLI (issue 17): dry run, run, the day's run done once,
``archive list`` and ``archive restore`` (twice is once)."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

from tests.acceptance.test_cli import cli_env, run_cli
from tests.conftest import url_for
from tests.integration.test_retention import _seed_edges
from worker.config import Settings
from worker.storage import inventory


async def test_retention_commands_as_an_operator_runs_them(
    settings: Settings, tmp_path: Path
) -> None:
    # An hour's margin: the CLI's clock runs later than this test's.
    edges = await _seed_edges(settings.database_url, margin=timedelta(hours=1))
    env = cli_env(settings, ARCHIVE_URL=f"file://{tmp_path}/archive", LOG_LEVEL="WARNING")
    code, out = await run_cli(env, "retention", "run", "--dry-run")
    assert code == 0 and "system_metrics: 1 rows would be archived" in out, out
    assert not (tmp_path / "archive").exists()

    code, out = await run_cli(env, "retention", "run")
    assert code == 0 and "succeeded, done now" in out and "3 archive objects written" in out, out
    code, out = await run_cli(env, "retention", "run")
    assert code == 0 and "already done (attempt 1)" in out, out

    code, out = await run_cli(env, "archive", "list")
    assert code == 0 and len([line for line in out.splitlines() if "file://" in line]) == 3, out

    target = url_for(f"utxoiq_test_archive_{uuid.uuid4().hex[:10]}", settings)
    restore = ["archive", "restore", "--table", "backfill_jobs", "--from", "2000-01-01"]
    restore += ["--to", "2100-01-01", "--into", target]
    try:
        code, out = await run_cli(env, *restore)
        assert code == 0 and "1 archived rows in range, 1 inserted" in out, out
        code, out = await run_cli(env, *restore)
        assert code == 0 and "1 archived rows in range, 0 inserted" in out, out
        async with inventory.connect(target) as conn:
            restored = await conn.fetchval("SELECT id::text FROM backfill_jobs")
        assert restored == edges["backfill_jobs"]["out"]
    finally:
        await inventory.drop_database(target, inventory.database_name(target))
