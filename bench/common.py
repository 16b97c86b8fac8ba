"""What every benchmark shares: a scratch database, timing, and the JSON line."""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Awaitable, Callable

import asyncpg
from sqlalchemy import make_url

from worker.config import Settings
from worker.migrate import upgrade


def report(
    scenario: str,
    figure: str,
    value: float,
    baseline: str | None = None,
    baseline_value: float | None = None,
) -> None:
    """One figure as one JSON line, with the baseline measured in the same run."""
    ratio = None if not baseline_value else round(value / baseline_value, 3)
    line = {
        "scenario": scenario,
        "figure": figure,
        "value": round(value, 1),
        "baseline": baseline,
        "baseline_value": None if baseline_value is None else round(baseline_value, 1),
        "ratio": ratio,
    }
    print(json.dumps(line), flush=True)


DATABASES: list[str] = []
"""Every scratch database a scenario made; dropped after the scenario (cleanup)."""


def _admin_dsn(base: Settings) -> str:
    url = make_url(base.database_url)
    return url.set(drivername="postgresql", database="postgres").render_as_string(False)


async def fresh_database(name: str) -> Settings:
    """Drop and recreate database ``name``, migrated to head, then checkpointed; its
    Settings.

    The checkpoint writes out what earlier work left dirty in shared buffers (the
    last scenario's rows, this migration), so the checkpointer does not do it during
    the timed part.
    """
    base = Settings.from_env()
    conn = await asyncpg.connect(_admin_dsn(base))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
    settings = dataclasses.replace(
        base, database_url=make_url(base.database_url).set(database=name).render_as_string(False)
    )
    await upgrade(settings)
    DATABASES.append(name)
    conn = await asyncpg.connect(_admin_dsn(base))
    try:
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    return settings


async def drop_databases() -> None:
    """Drop the scenario's scratch databases: their tables would otherwise draw
    autovacuum work into the next scenario's timed part."""
    conn = await asyncpg.connect(_admin_dsn(Settings.from_env()))
    try:
        while DATABASES:
            await conn.execute(f'DROP DATABASE IF EXISTS "{DATABASES.pop()}" WITH (FORCE)')
    finally:
        await conn.close()


def asyncpg_dsn(settings: Settings) -> str:
    url = make_url(settings.database_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


async def median_rate(
    rounds: int,
    count: int,
    setup: Callable[[], Awaitable[None]],
    body: Callable[[], Awaitable[None]],
) -> float:
    """Median of ``rounds`` measurements of ``count / seconds(body)``."""
    rates = []
    for _ in range(rounds):
        await setup()
        started = time.perf_counter()
        await body()
        rates.append(count / (time.perf_counter() - started))
    return statistics.median(rates)
