"""The demo's last act: back the demo database up, restore it into a second one, and
show both row counts side by side."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import make_url

from handlers.backups import catalog, restore
from handlers.backups.task import backup_store, run_backup
from handlers.maintenance_runs import RunKey
from worker.config import Settings
from worker.storage.inventory import database_name


async def backup_and_restore(settings: Settings) -> None:
    source = database_name(settings.database_url)
    target_name = f"{source}_restored"
    target = make_url(settings.database_url).set(database=target_name)
    # Outside the daily run's ledger: the demo may run many times a day, and each
    # time it shows a backup of what it just stored.
    result = await run_backup(settings, RunKey("backup", datetime.now(UTC).date()), 1)
    dump = result.objects[0]
    print(f"\n== backup: {dump['uri']} ({dump['size_bytes']:,} bytes, verified)")
    store = backup_store(settings)
    try:
        chosen = await catalog.choose(store, source, dump["uri"], latest=False)
        url = target.render_as_string(hide_password=False)
        done = await restore.restore(settings, store, chosen, url, clean=True, jobs=2)
    finally:
        store.close()
    print(f"== restored into {target_name}: rows per table, {source} at the dump | {target_name}")
    for table, rows in result.row_counts.items():
        print(f"  {table:<28} {rows:>8} | {done.rows.get(table, 0):>8}")
