"""``utxoiq-worker migrate``: create the database if missing, then Alembic upgrade."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from alembic.config import Config

from alembic import command
from handlers.metrics import ensure_months_ahead
from worker.config import Settings
from worker.storage.database import create_database_if_missing, create_engine

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MONTHS_AHEAD = 3


def alembic_config(database_url: str) -> Config:
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "alembic"))
    config.attributes["database_url"] = database_url
    return config


async def upgrade(settings: Settings, revision: str = "head") -> None:
    created = await create_database_if_missing(settings.database_url)
    # Alembic's env.py runs its own event loop: give it a thread of its own.
    await asyncio.to_thread(command.upgrade, alembic_config(settings.database_url), revision)
    await ensure_partitions_ahead(settings)
    log.info("database migrated", extra={"revision": revision, "database_created": created})


async def downgrade(settings: Settings, revision: str) -> None:
    await asyncio.to_thread(command.downgrade, alembic_config(settings.database_url), revision)
    log.info("database downgraded", extra={"revision": revision})


async def ensure_partitions_ahead(settings: Settings, months: int = MONTHS_AHEAD) -> None:
    """Create the metric partitions of this month and the next ``months``."""
    engine = create_engine(settings, pool_size=1, max_overflow=0)
    try:
        await ensure_months_ahead(engine, months)
    finally:
        await engine.dispose()
