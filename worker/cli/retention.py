"""``utxoiq-worker retention run`` and ``archive list|restore``: retention for an operator.

``retention run`` is the scheduled run (the same ledger: a day archived is not
archived twice; ``--table`` is a run of its own, ``retention:<table>``);
``--dry-run`` only counts. ``archive`` reads the store at ``ARCHIVE_URL``.
"""

from __future__ import annotations

import argparse
from datetime import UTC, date, datetime, time

from handlers.maintenance import perform
from handlers.maintenance_runs import RunKey
from handlers.retention import restore
from handlers.retention.tables import TABLES, TableSpec, spec
from handlers.retention.task import archive_store, dry_run, tables_of
from worker.config import Settings
from worker.pipeline.crash_points import CrashPoints
from worker.storage.database import create_engine
from worker.storage.objects import ObjectStore


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    retention = commands.add_parser("retention", help="archive and delete rows past their window")
    actions = retention.add_subparsers(dest="action", required=True)
    run = actions.add_parser("run", help="today's retention run (the scheduled one)")
    run.add_argument("--dry-run", action="store_true", help="count what would go, change nothing")
    run.add_argument("--table", choices=sorted(TABLES), help="only this table (a run of its own)")

    archive = commands.add_parser("archive", help="what retention archived")
    verbs = archive.add_subparsers(dest="action", required=True)
    listing = verbs.add_parser("list", help="archive objects, oldest first")
    listing.add_argument("--table", choices=sorted(TABLES), help="only this table")
    back = verbs.add_parser("restore", help="load archived rows into a database")
    back.add_argument("--table", required=True, choices=sorted(TABLES))
    back.add_argument("--from", dest="start", required=True, type=date.fromisoformat)
    back.add_argument("--to", dest="end", required=True, type=date.fromisoformat, help="exclusive")
    back.add_argument("--into", required=True, metavar="DATABASE_URL")


def _day_start(day: date) -> datetime:
    return datetime.combine(day, time(), UTC)


async def retention(args: argparse.Namespace, settings: Settings) -> int:
    task = "retention" if args.table is None else f"retention:{args.table}"
    run = RunKey(task, datetime.now(UTC).date())
    if args.dry_run:
        counts = await dry_run(settings, tables_of(run))
        for table, months in counts.items():
            total = sum(months.values())
            print(f"{table}: {total:,} rows would be archived")
            for month, rows in months.items():
                print(f"  {month}  {rows:>12,}")
        return 0
    engine = create_engine(settings, pool_size=2, max_overflow=0)
    try:
        outcome = await perform(engine, settings, run, CrashPoints.from_env())
    finally:
        await engine.dispose()
    how = "done now" if outcome.ran else f"already done (attempt {outcome.record.attempt})"
    print(f"{run}: succeeded, {how}")
    for table, rows in outcome.record.row_counts.items():
        print(f"  {table:<20} {rows:>12,} rows archived")
    written = [o for o in outcome.record.objects if "uri" in o]
    print(f"  {len(written)} archive objects written")
    return 0


async def archive(args: argparse.Namespace, settings: Settings) -> int:
    store = archive_store(settings)
    try:
        if args.action == "list":
            return await _list(store, [spec(args.table)] if args.table else list(TABLES.values()))
        start, end = _day_start(args.start), _day_start(args.end)
        if end <= start:
            raise ValueError("--to must be after --from")
        read, inserted = await restore.restore_archive(
            settings, store, spec(args.table), start, end, args.into
        )
        print(f"{args.table}: {read:,} archived rows in range, {inserted:,} inserted")
        return 0
    finally:
        store.close()


async def _list(store: ObjectStore, tables: list[TableSpec]) -> int:
    print(f"{'table':<18} {'first (UTC)':<20} {'last (UTC)':<20} {'rows':>9}  object")
    for table in tables:
        for item in await restore.list_archive(store, table):
            m = item.manifest
            print(
                f"{m.table:<18} {m.first_at:%Y-%m-%d %H:%M:%S}  {m.last_at:%Y-%m-%d %H:%M:%S}"
                f"  {m.rows:>9,}  {m.object}"
            )
    return 0
