"""What every benchmark shares: a scratch database, timing, and the JSON line."""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence

import asyncpg
from sqlalchemy import make_url

from handlers import registry
from worker.config import Settings
from worker.storage.migrate import upgrade


def report(
    scenario: str,
    figure: str,
    value: float,
    baseline: str | None = None,
    baseline_value: float | None = None,
    rounds: Sequence[tuple[float, float]] | None = None,
) -> None:
    """One figure as one JSON line, with the baseline measured in the same run; where
    both are medians, ``rounds`` gives each round's value and baseline."""
    ratio = None if not baseline_value else round(value / baseline_value, 3)
    line = {
        "scenario": scenario,
        "figure": figure,
        "value": round(value, 1),
        "baseline": baseline,
        "baseline_value": None if baseline_value is None else round(baseline_value, 1),
        "ratio": ratio,
    }
    if rounds is not None:
        line["rounds"] = [[round(v, 1), round(b, 1)] for v, b in rounds]
    print(json.dumps(line), flush=True)


DATABASES: list[str] = []
"""Every scratch database a scenario made; dropped after the scenario (cleanup)."""


async def _as_admin(*statements: str) -> None:
    """Run ``statements`` on the server's ``postgres`` database."""
    url = make_url(Settings.from_env().database_url)
    admin = url.set(drivername="postgresql", database="postgres").render_as_string(False)
    conn = await asyncpg.connect(admin)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def _drop(name: str) -> str:
    return f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'


def scratch_settings(name: str) -> Settings:
    """The environment's Settings, pointed at database ``name`` (nothing is created)."""
    base = Settings.from_env()
    url = make_url(base.database_url).set(database=name).render_as_string(False)
    return dataclasses.replace(base, database_url=url)


async def fresh_database(name: str) -> Settings:
    """Drop and recreate database ``name``, migrated to head, then checkpointed; its
    Settings.

    The checkpoint writes out what earlier work left dirty in shared buffers (the
    last scenario's rows, this migration), so the checkpointer does not do it during
    the timed part.
    """
    await _as_admin(_drop(name))
    settings = scratch_settings(name)
    await upgrade(settings, registry())
    if name not in DATABASES:
        DATABASES.append(name)
    await _as_admin("CHECKPOINT")
    return settings


async def drop_databases() -> None:
    """Drop the scenario's scratch databases: their tables would otherwise draw
    autovacuum work into the next scenario's timed part."""
    names, DATABASES[:] = list(DATABASES), []
    await _as_admin(*(_drop(name) for name in names))


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


def percentile(values: Sequence[float], percent: int) -> float:
    """The ``percent`` percentile of ``values`` (at least two of them)."""
    return statistics.quantiles(values, n=100)[percent - 1]
