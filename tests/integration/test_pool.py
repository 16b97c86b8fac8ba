"""The connection pool after the server closed its connections: replaced at checkout,
at no round trip's cost (``worker.storage.database`` runs without SQLAlchemy's pre-ping)."""

from __future__ import annotations

import asyncio

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import admin_dsn
from worker.storage.database import connection, transaction


async def backend_pids(engine: AsyncEngine, count: int) -> set[int]:
    """Check out ``count`` connections at once (so the pool holds that many); their pids."""
    pids: set[int] = set()
    ready = asyncio.Event()

    async def hold() -> None:
        async with connection(engine) as conn:
            pids.add(int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()))
            if len(pids) == count:
                ready.set()
            await ready.wait()

    await asyncio.gather(*(hold() for _ in range(count)))
    return pids


async def test_connections_closed_by_the_server_are_replaced_at_checkout(
    engine: AsyncEngine,
) -> None:
    pooled = await backend_pids(engine, 3)
    admin = await asyncpg.connect(admin_dsn())
    try:
        # What a restart or an operator does to every pooled connection.
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", list(pooled)
        )
    finally:
        await admin.close()
    await asyncio.sleep(0.2)  # the FATAL and the end of stream reach the client

    # Every statement succeeds, on new connections: no error reaches the caller.
    for _ in range(len(pooled) + 1):
        async with transaction(engine) as conn:
            pid = int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())
        assert pid not in pooled
