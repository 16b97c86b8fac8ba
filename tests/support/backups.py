"""What the backup tests share: a seeded database, per-table checksums, a slow pg_dump."""

from __future__ import annotations

import dataclasses
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from handlers.maintenance import perform
from handlers.maintenance_runs import RunKey, RunOutcome
from worker.config import Settings
from worker.storage import inventory

TODAY = datetime.now(UTC).date()


async def seed(database_url: str, rows: int = 3000) -> None:
    """Rows in every table, metrics across several monthly partitions, awkward values
    (NULLs, JSON, text with quotes and newlines, bytea) that a dump must carry intact."""
    statements = [
        f"""INSERT INTO insight_feedback (insight_id, user_id, rating, comment, flag_type,
                created_at, updated_at, event_key)
            SELECT 'insight-' || g, 'user-' || (g % 97),
                   CASE WHEN g % 5 = 0 THEN NULL ELSE 1 + g % 5 END,
                   CASE WHEN g % 3 = 0 THEN NULL ELSE E'it''s\\n"good" ' || g END,
                   CASE WHEN g % 11 = 0 THEN 'spam' END,
                   now() - make_interval(hours => g), now() - make_interval(mins => g),
                   decode(md5(g::text), 'hex')
            FROM generate_series(1, {rows}) g""",
        f"""INSERT INTO backfill_jobs (id, job_type, start_block, end_block, current_block,
                status, progress_percentage, started_at, status_event_at, status_event_key,
                first_event_key)
            SELECT md5('job' || g)::uuid, 'blocks', 0, 1000, g % 1000,
                   (ARRAY['running','paused','completed','failed'])[1 + g % 4],
                   (g % 1000) / 10.0, now() - make_interval(days => g % 30), now(),
                   decode(md5(g::text), 'hex'), decode(md5(g::text), 'hex')
            FROM generate_series(1, {rows // 10}) g""",
        f"""INSERT INTO system_metrics (id, service_name, metric_type, metric_value, unit,
                "timestamp", metadata)
            SELECT md5('m' || g)::uuid, 'svc-' || (g % 7), 'cpu', g * 0.25, 'percent',
                   date_trunc('month', now()) - make_interval(days => g % 50),
                   jsonb_build_object('host', 'h' || (g % 13), 'n', g)
            FROM generate_series(1, {rows}) g""",
        """INSERT INTO system_metric_ids (id, "timestamp")
            SELECT id, "timestamp" FROM system_metrics""",
    ]
    async with inventory.connect(database_url) as conn:
        await conn.execute(
            """SELECT ensure_system_metrics_partition(date_trunc('month', now())
                      - make_interval(days => d)) FROM generate_series(0, 60, 10) d"""
        )
        for sql in statements:
            await conn.execute(sql)


async def checksums(database_url: str) -> dict[str, tuple[int, str]]:
    """Rows and an md5 of every row's text, per table: equal only if the data is."""
    sums: dict[str, tuple[int, str]] = {}
    async with inventory.connect(database_url) as conn:
        for table in await inventory.count_rows(conn):
            quoted = '"' + table.replace('"', '""') + '"'
            row = await conn.fetchrow(
                "SELECT count(*) AS n,"
                " md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) AS sum"
                f" FROM {quoted} t"
            )
            sums[table] = (int(row["n"]), str(row["sum"]))
    return sums


def scheduled_now() -> tuple[str, RunKey]:
    """A backup request's ``scheduled_for`` and the run it names, from one reading of the
    clock: a suite that crosses midnight UTC must not wait on the other day's run."""
    moment = datetime.now(UTC)
    return moment.isoformat().replace("+00:00", "Z"), RunKey("backup", moment.date())


def backup_settings(settings: Settings, backup_url: str, **changes: object) -> Settings:
    return dataclasses.replace(
        settings,
        backup_url=backup_url,
        maintenance_heartbeat_s=0.5,
        maintenance_stale_s=2.0,
        **changes,  # type: ignore[arg-type]
    )


async def backup_now(engine: AsyncEngine, settings: Settings) -> RunOutcome:
    return await perform(engine, settings, RunKey("backup", TODAY))


def slow_tools(directory: Path, delay_s: float) -> Path:
    """A PG_BIN_DIR whose pg_dump is the real one with its output held back
    ``delay_s`` (a slow network, in effect): long enough to kill a run midway."""
    directory.mkdir(parents=True, exist_ok=True)
    real_dump = shutil.which("pg_dump")
    real_restore = shutil.which("pg_restore")
    assert real_dump and real_restore, "the PostgreSQL client is not installed"
    script = directory / "pg_dump"
    script.write_text(
        "#!/bin/bash\n"
        "set -o pipefail\n"
        f'if [[ "$1" == --version ]]; then exec {real_dump} --version; fi\n'
        f'{real_dump} "$@" | {{ sleep {delay_s}; cat; }}\n'
    )
    script.chmod(0o755)
    os.symlink(real_restore, directory / "pg_restore")
    return directory


def descendants(pid: int, name: str) -> list[int]:
    """Processes called ``name`` below ``pid`` in the process tree."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        parents[int(entry)] = ppid
        names[int(entry)] = comm
    found = []
    for child, comm in names.items():
        ancestor = parents.get(child)
        while ancestor:
            if ancestor == pid:
                if comm == name:
                    found.append(child)
                break
            ancestor = parents.get(ancestor)
    return found
