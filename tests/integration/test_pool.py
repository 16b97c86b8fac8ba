"""The connection pool after the server closed its connections: replaced at checkout,
at no round trip's cost (``worker.storage.database`` runs without SQLAlchemy's pre-ping);
and the bare lease of a single-statement read (``single_statement``): back to the pool
however the read ends."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import admin_dsn
from worker import exceptions as exc
from worker.config import Settings
from worker.storage.database import (
    connection,
    create_engine,
    pool_use,
    single_statement,
    transaction,
)


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

    # Every statement succeeds, on new connections: no error reaches the caller, whether
    # it runs in a transaction or as a single statement on the pool's bare lease.
    for _ in range(len(pooled) + 1):
        async with transaction(engine) as conn:
            pid = int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())
        assert pid not in pooled
        async with single_statement(engine) as driver:
            assert await driver.fetchval("SELECT pg_backend_pid()") not in pooled


async def test_a_single_statement_read_returns_its_connection_however_it_ends(
    engine: AsyncEngine,
) -> None:
    async with single_statement(engine) as driver:
        assert await driver.fetchval("SELECT 1") == 1
        assert pool_use(engine)["checked_out"] == 1
    assert pool_use(engine)["checked_out"] == 0

    # A statement the server refuses: the worker's error, and the connection is back.
    with pytest.raises(exc.QueryError):
        async with single_statement(engine) as driver:
            await driver.fetchval("SELECT * FROM no_such_table")
    assert pool_use(engine)["checked_out"] == 0

    # A reader cancelled mid-statement (a client that went away).
    started = asyncio.Event()

    async def slow_read() -> None:
        async with single_statement(engine) as driver:
            started.set()
            await driver.fetchval("SELECT pg_sleep(10)")

    reader = asyncio.create_task(slow_read())
    await started.wait()
    await asyncio.sleep(0.1)  # the statement is on the server
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert pool_use(engine)["checked_out"] == 0
    async with single_statement(engine) as driver:
        assert await driver.fetchval("SELECT 2") == 2


async def test_a_single_statement_that_timed_out_never_goes_back_to_the_pool(
    settings: Settings,
) -> None:
    """Like a batch's (``_discard_on_timeout``): a connection whose statement timed out
    on the client is discarded, so the next read does not wait for its cancellation."""
    engine = create_engine(settings, pool_size=1)
    try:
        with pytest.raises(exc.DatabaseUnavailableError):
            async with single_statement(engine) as driver:
                timed_out = await driver.fetchval("SELECT pg_backend_pid()")
                await driver.fetchval("SELECT pg_sleep(5)", timeout=0.2)
        assert pool_use(engine)["checked_out"] == 0
        async with single_statement(engine) as driver:
            assert await driver.fetchval("SELECT pg_backend_pid()") != timed_out
    finally:
        await engine.dispose()


async def test_a_reader_waiting_for_a_connection_is_not_starved(settings: Settings) -> None:
    """The pool's queue wakes a waiting reader but would let a running task take the
    connection first: a task reading back to back must not keep it from the others."""
    engine = create_engine(settings, pool_size=1)
    hog_reads = 0
    hog_started = asyncio.Event()

    async def hog() -> None:
        nonlocal hog_reads
        for _ in range(200):
            async with single_statement(engine) as driver:
                hog_started.set()
                await driver.fetchval("SELECT 1")
            hog_reads += 1

    async def waiter() -> int:
        await hog_started.wait()
        async with single_statement(engine) as driver:
            await driver.fetchval("SELECT 1")
        return hog_reads

    try:
        hogging = asyncio.create_task(hog())
        served_after = await waiter()
        await hogging
    finally:
        await engine.dispose()
    assert served_after <= 2, f"the waiting reader was served after {served_after} reads"
