"""``utxoiq-worker migrate``: create the database if missing, then Alembic upgrade."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from alembic.config import Config

from alembic import command
from worker.config import Settings
from worker.storage.database import create_database_if_missing, create_engine
from worker.topics import Registry

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def alembic_config(database_url: str) -> Config:
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "alembic"))
    config.attributes["database_url"] = database_url
    return config


async def upgrade(settings: Settings, registry: Registry, revision: str = "head") -> None:
    """Create the database if missing, upgrade it, run every topic's start-up hook."""
    created = await create_database_if_missing(settings.database_url)
    # Alembic's env.py runs its own event loop: give it a thread of its own.
    await asyncio.to_thread(command.upgrade, alembic_config(settings.database_url), revision)
    await run_start_hooks(settings, registry)
    log.info("database migrated", extra={"revision": revision, "database_created": created})


async def downgrade(settings: Settings, revision: str) -> None:
    await asyncio.to_thread(command.downgrade, alembic_config(settings.database_url), revision)
    log.info("database downgraded", extra={"revision": revision})


async def run_start_hooks(settings: Settings, registry: Registry) -> None:
    """Every topic's start-up hook (metric partitions ahead, say), on a small pool."""
    engine = create_engine(settings, pool_size=1, max_overflow=0)
    try:
        for topic in registry:
            if topic.on_start is not None:
                await topic.on_start(engine)
    finally:
        await engine.dispose()


def head_revision() -> str:
    """The revision this code's migrations end at."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config("")).get_current_head()
    if head is None:
        raise RuntimeError("the project has no Alembic revision")
    return head
