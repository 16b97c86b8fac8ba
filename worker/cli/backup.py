"""``utxoiq-worker backup run|list|verify|restore|prune``: backups for an operator.

``run`` is the scheduled run itself (the same ledger: it never overlaps a scheduled
one, and a day already backed up is not backed up twice); the others read the store
at ``BACKUP_URL``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Iterator
from datetime import UTC, date, datetime

from handlers.backups import catalog, prune, restore, verify
from handlers.backups.task import backup_store
from handlers.maintenance import perform
from handlers.maintenance_runs import RunKey
from worker.config import Settings
from worker.progress import Progress
from worker.storage.database import create_engine
from worker.storage.inventory import database_name
from worker.storage.objects import ObjectStore


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    backup = commands.add_parser("backup", help="take, list, verify, restore and prune backups")
    actions = backup.add_subparsers(dest="action", required=True)
    run = actions.add_parser("run", help="take today's backup (the scheduled run), verified")
    run.add_argument("--day", type=date.fromisoformat, help="the run's UTC day (default today)")
    listing = actions.add_parser("list", help="the backups in BACKUP_URL, oldest first")
    listing.add_argument("--json", action="store_true", help="one JSON object per backup")
    check = actions.add_parser("verify", help="read back, hash, restore into scratch, count")
    _add_choice(check)
    into = actions.add_parser("restore", help="restore a backup into a database")
    _add_choice(into)
    into.add_argument("--to", required=True, metavar="DATABASE_URL", help="the target database")
    into.add_argument("--clean", action="store_true", help="replace a non-empty target's tables")
    into.add_argument(
        "--jobs",
        type=int,
        default=int(os.environ.get("RESTORE_JOBS", min(4, os.cpu_count() or 1))),
        help="parallel pg_restore jobs (env RESTORE_JOBS; 1 streams without a local copy)",
    )
    trim = actions.add_parser("prune", help="delete backups past BACKUP_RETENTION_DAYS")
    trim.add_argument("--dry-run", action="store_true", help="only say what would go")


def _add_choice(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--object", metavar="URI", help="the backup's dump (or manifest) URI")
    which.add_argument("--latest", action="store_true", help="the newest verified backup")


async def command(args: argparse.Namespace, settings: Settings) -> int:
    actions = {
        "run": _run,
        "list": _list,
        "verify": _verify,
        "restore": _restore,
        "prune": _prune,
    }
    with _store(settings) as store:
        return await actions[args.action](args, settings, store)


@contextlib.contextmanager
def _store(settings: Settings) -> Iterator[ObjectStore]:
    store = backup_store(settings)
    try:
        yield store
    finally:
        store.close()


async def _run(args: argparse.Namespace, settings: Settings, store: ObjectStore) -> int:
    run = RunKey("backup", args.day or datetime.now(UTC).date())
    engine = create_engine(settings, pool_size=2, max_overflow=0)
    try:
        outcome = await perform(engine, settings, run)
    finally:
        await engine.dispose()
    record = outcome.record
    how = "taken now" if outcome.ran else f"already done (attempt {record.attempt})"
    print(f"backup {run.day}: succeeded, {how}")
    for item in record.objects:
        size = f"  {item['size_bytes']:,} bytes" if "size_bytes" in item else ""
        print(f"  {item['uri']}{size}")
    print(f"  rows: {sum(record.row_counts.values())} in {len(record.row_counts)} tables")
    return 0


async def _list(args: argparse.Namespace, settings: Settings, store: ObjectStore) -> int:
    backups = await catalog.list_backups(store, database_name(settings.database_url))
    if args.json:
        for b in backups:
            print(json.dumps(_describe(store.uri(b.key), b), default=str))
        return 0
    print(f"{'taken (UTC)':<20} {'size':>12} {'verified':<9} {'rows':>12}  object")
    for b in backups:
        size = f"{b.dump.size_bytes:,}" if b.dump is not None else "-"
        if b.manifest is None:
            verified, rows = "incomplete", "-"
        else:
            verified, rows = ("yes" if b.verified else "FAILED"), f"{b.manifest.total_rows:,}"
        taken = f"{b.taken_at:%Y-%m-%d %H:%M:%S}"
        print(f"{taken:<20} {size:>12} {verified:<9} {rows:>12}  {store.uri(b.key)}")
    if not backups:
        print(f"(no backups in {store.url})")
    return 0


def _describe(uri: str, b: catalog.Backup) -> dict[str, object]:
    return {
        "object": uri,
        "taken_at": b.taken_at.isoformat(),
        "size_bytes": None if b.dump is None else b.dump.size_bytes,
        "complete": b.complete,
        "verified": b.verified,
        "rows": None if b.manifest is None else b.manifest.rows,
        "error": b.manifest_error,
    }


async def _verify(args: argparse.Namespace, settings: Settings, store: ObjectStore) -> int:
    chosen = await catalog.choose(
        store, database_name(settings.database_url), args.object, args.latest
    )
    assert chosen.manifest is not None  # choose returns complete backups only
    manifest = chosen.manifest
    expected = verify.Expected(chosen.key, manifest.sha256, manifest.size_bytes, manifest.rows)
    progress = Progress("verify", total_bytes=manifest.size_bytes)
    seconds = await verify.verify(settings, store, expected, progress)
    print(f"verified {store.uri(chosen.key)} in {seconds:.1f} s:")
    _print_rows(manifest.rows)
    return 0


async def _restore(args: argparse.Namespace, settings: Settings, store: ObjectStore) -> int:
    if args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
    chosen = await catalog.choose(
        store, database_name(settings.database_url), args.object, args.latest
    )
    done = await restore.restore(settings, store, chosen, args.to, clean=args.clean, jobs=args.jobs)
    print(f"restored {done.uri} into {done.database} in {done.seconds:.1f} s:")
    _print_rows(done.rows)
    if done.revision != done.head:
        print(
            f"schema revision {done.revision}; this worker's is {done.head}: run "
            "`utxoiq-worker migrate` with DATABASE_URL set to the target before using it"
        )
    return 0


async def _prune(args: argparse.Namespace, settings: Settings, store: ObjectStore) -> int:
    doomed = await prune.prune(
        store,
        database_name(settings.database_url),
        datetime.now(UTC),
        settings.backup_retention_days,
        dry_run=args.dry_run,
    )
    verb = "would delete" if args.dry_run else "deleted"
    for item in doomed:
        print(f"{verb} {store.uri(item.backup.key)} ({item.why})")
    print(f"{len(doomed)} backup(s) {verb}")
    return 0


def _print_rows(rows: dict[str, int]) -> None:
    width = max((len(t) for t in rows), default=5)
    for table, count in rows.items():
        print(f"  {table:<{width}} {count:>12,}")
    print(f"  {'total':<{width}} {sum(rows.values()):>12,}")
