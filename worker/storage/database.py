"""The database boundary: one async engine, and driver errors translated once.

Every statement of the worker runs inside ``wrap_exceptions`` (directly or through
``transaction``), so callers only ever see ``worker.exceptions`` types: transient
ones (connection lost, pool timeout, deadlock) that the runtime nacks, and
permanent ones (constraint, bad value) that it dead-letters.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import sqlalchemy.exc as sa_exc
from asyncpg.pgproto.pgproto import UUID as _DriverUUID
from sqlalchemy import event, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn

from worker import exceptions as exc
from worker.config import Settings

log = logging.getLogger(__name__)

# SQLSTATE classes and codes that succeed when simply tried again.
_TRANSIENT_SQLSTATES = {
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "55P03",  # lock_not_available
    "57014",  # query_canceled (statement_timeout)
    "57P01",  # admin_shutdown
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now
    "53300",  # too_many_connections
    "53400",  # configuration_limit_exceeded
    "3D000",  # invalid_catalog_name: the database does not exist (yet), at connect
}

_CHECK_VIOLATION = "23514"
# PostgreSQL reports a row that fits no partition as a check violation; only its text
# ('no partition of relation "system_metrics" found for row') tells it from a broken
# CHECK constraint, and the two call for opposite actions (retry, dead-letter).
_NO_PARTITION = "no partition of relation"

uuid_from_bytes: Callable[[bytes], uuid.UUID] = _DriverUUID
"""A ``uuid.UUID`` from its 16 bytes, as the driver's own UUID type.

That type is a ``uuid.UUID`` (equal to and hashed like one), built in C where
``uuid.UUID(bytes=...)`` runs Python, and the driver sends it as is. The constructor
itself, not a function around it: callers build one per metric sample.
"""


def create_engine(settings: Settings, **overrides: Any) -> AsyncEngine:
    """The worker's one connection pool, sized from the environment."""
    options: dict[str, Any] = {
        # Overflow connections are kept like the others: SQLAlchemy closes an overflow
        # connection at checkin whenever pool_size are idle, so a steady concurrency
        # above pool_size opens and closes a connection for nearly every checkout
        # (uncached reads at 32 at once: p99 42 ms instead of 4.6 ms, README). The
        # connection budget counts pool_size + max_overflow per process either way.
        "pool_size": settings.database_pool_size + settings.database_max_overflow,
        "max_overflow": 0,
        "pool_timeout": settings.database_pool_timeout_s,
        # No pre-ping: three round trips per checkout (BEGIN, ping, ROLLBACK), where a
        # small batch makes few more; _drop_closed_connections does it for free.
        "pool_pre_ping": False,
        # Both timeouts, never infinite: the server's statement_timeout ends a statement
        # stuck in PostgreSQL (a lock wait) and frees what it holds; asyncpg's
        # command_timeout ends a wait on a network that stopped carrying bytes, which
        # no server setting can see. Either way the batch fails transient and is nacked.
        "connect_args": {
            "timeout": settings.database_connect_timeout_s,
            "command_timeout": settings.database_command_timeout_s,
            "server_settings": {
                "statement_timeout": str(round(settings.database_statement_timeout_s * 1000)),
            },
        },
    }
    options.update(overrides)
    engine = create_async_engine(settings.database_url, **options)
    event.listen(engine.sync_engine, "checkout", _drop_closed_connections)
    return engine


def pool_use(engine: AsyncEngine) -> dict[str, int]:
    """The pool's open connections by state: in use, and idle."""
    pool: Any = engine.sync_engine.pool
    return {"checked_out": int(pool.checkedout()), "idle": int(pool.checkedin())}


def _drop_closed_connections(
    dbapi_connection: Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection
) -> None:
    """Replace, at checkout, a pooled connection whose socket the server closed.

    A database restart or a terminated backend closes the server's end; asyncpg
    sees the end of the stream as soon as it arrives and marks the connection
    closed, so this costs no round trip. SQLAlchemy then connects anew. A
    connection cut off silently (no FIN) still fails at its first statement, and
    that batch is nacked (transient) like any other.
    """
    driver = record.driver_connection
    if driver is not None and driver.is_closed():
        raise sa_exc.DisconnectionError("connection closed by the server")


def translate(error: BaseException) -> exc.WorkerError:
    """Map a driver or SQLAlchemy error onto the worker's hierarchy."""
    if isinstance(error, exc.WorkerError):
        return error
    original: BaseException = error
    if isinstance(error, sa_exc.DBAPIError) and error.orig is not None:
        original = error.orig
        # SQLAlchemy's asyncpg adapter wraps the driver error once more.
        original = getattr(original, "__cause__", None) or original
    if isinstance(error, sa_exc.TimeoutError):
        return exc.DatabaseUnavailableError(f"connection pool timed out: {error}")
    sqlstate = getattr(original, "sqlstate", None)
    detail = str(original).strip() or type(original).__name__
    if isinstance(original, (OSError, asyncio.TimeoutError, TimeoutError)):
        return exc.DatabaseUnavailableError(f"database unreachable: {detail}")
    if isinstance(
        original,
        (
            asyncpg.exceptions.ConnectionDoesNotExistError,
            asyncpg.InterfaceError,
            # The protocol lost its state, e.g. a FATAL (pg_terminate_backend) that
            # arrived while the connection was idle: that connection is unusable.
            asyncpg.InternalClientError,
        ),
    ):
        return exc.DatabaseUnavailableError(f"database connection lost: {detail}")
    if isinstance(original, asyncpg.PostgresConnectionError) or (
        sqlstate is not None
        and (
            # 08: connection exception; 28: authentication refused at connect.
            sqlstate.startswith(("08", "28")) or sqlstate in _TRANSIENT_SQLSTATES
        )
    ):
        return exc.DatabaseUnavailableError(f"database unavailable ({sqlstate}): {detail}")
    if sqlstate == _CHECK_VIOLATION and _NO_PARTITION in detail:
        return exc.MissingPartitionError(f"partition missing ({sqlstate}): {detail}")
    if sqlstate is not None and sqlstate.startswith("23"):
        return exc.IntegrityError(f"constraint violated ({sqlstate}): {detail}")
    if sqlstate is not None and sqlstate.startswith("22"):
        return exc.ValidationError(f"value refused by the database ({sqlstate}): {detail}")
    if isinstance(error, (sa_exc.OperationalError, sa_exc.InterfaceError)):
        return exc.DatabaseUnavailableError(f"database unavailable: {detail}")
    return exc.QueryError(f"query failed ({sqlstate}): {detail}")


@asynccontextmanager
async def wrap_exceptions() -> AsyncIterator[None]:
    """Re-raise anything the driver raises as a ``worker.exceptions`` error."""
    try:
        yield
    except exc.WorkerError:
        raise
    except (
        sa_exc.SQLAlchemyError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        asyncpg.InternalClientError,
    ) as error:
        raise translate(error) from error
    except (OSError, TimeoutError) as error:
        raise translate(error) from error


def _timed_out(error: BaseException) -> bool:
    """A client-side timeout (asyncpg ``command_timeout``), however SQLAlchemy wrapped it."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, TimeoutError):
            return True
        if isinstance(seen, sa_exc.DBAPIError) and seen.orig is not None:
            seen = seen.orig
        else:
            seen = seen.__cause__
    return False


@asynccontextmanager
async def _discard_on_timeout(
    conn: AsyncConnection | PoolProxiedConnection,
) -> AsyncIterator[None]:
    """Invalidate ``conn`` (a ``Connection``, or the pool's bare lease of
    ``single_statement``) when a statement under it timed out.

    After a client-side timeout asyncpg sends a cancel request on a second connection
    and every later operation on this one (the ROLLBACK on exit, the pool's reset)
    first waits for that cancel, up to another command timeout: on a stalled network
    the batch would take twice as long to fail. Invalidated, the connection is closed
    (SQLAlchemy allows that 2 s, then terminates it) and never goes back to the pool;
    the next checkout connects afresh.
    """
    try:
        yield
    except BaseException as error:
        if _timed_out(error):
            cause = error if isinstance(error, Exception) else None
            if isinstance(conn, AsyncConnection):
                if not conn.invalidated:
                    await conn.invalidate(cause)
            elif conn.is_valid:
                await greenlet_spawn(conn.invalidate, cause)
        raise


@asynccontextmanager
async def transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """One transaction on a pooled connection, errors translated."""
    # The outer discard sees a COMMIT that timed out; the inner one a statement, before
    # begin()'s ROLLBACK would wait for its cancellation.
    async with (
        wrap_exceptions(),
        engine.connect() as conn,
        _discard_on_timeout(conn),
        conn.begin(),
        _discard_on_timeout(conn),
    ):
        yield conn


@asynccontextmanager
async def connection(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A pooled connection for reads (autobegin, rolled back on exit), errors translated."""
    async with wrap_exceptions(), engine.connect() as conn, _discard_on_timeout(conn):
        yield conn


@asynccontextmanager
async def single_statement(engine: AsyncEngine) -> AsyncIterator[Any]:
    """A pooled asyncpg connection outside any transaction, errors translated: a read
    of one statement in one round trip (through SQLAlchemy it would be three: BEGIN,
    the statement, ROLLBACK).

    The lease is the engine's ``raw_connection()``: the same pool, its size, timeout
    and checkout hook, without a ``Connection`` built around it, which costs the
    process about as much CPU as the read itself (README, "The uncached read")."""
    dbapi_error: type[Exception] = engine.dialect.loaded_dbapi.Error
    async with wrap_exceptions():
        try:
            pooled = await engine.raw_connection()
        except dbapi_error as error:
            # A Connection would wrap a failed connect in SQLAlchemy's DBAPIError (what
            # translate() reads); the bare lease leaves the dialect's own error.
            raise sa_exc.DBAPIError.instance(None, None, error, dbapi_error) from error
        try:
            driver = pooled.driver_connection
            if driver is None:  # invalidated under us (a dropped connection)
                raise exc.DatabaseUnavailableError("database connection lost")
            async with _discard_on_timeout(pooled):
                yield driver
        finally:
            # Awaited in place, not shielded (a task per read): SQLAlchemy's pool is
            # safe against a cancellation inside its check-in (the record goes back,
            # and an interrupted close is never handed out again).
            await greenlet_spawn(pooled.close)
            # One turn of the loop before this task may check out again: the pool's
            # queue wakes a waiting reader but lets a running task take the connection
            # first, and a reader that read back to back would starve the others.
            await asyncio.sleep(0)


async def driver_connection(conn: AsyncConnection) -> Any:
    """The asyncpg connection under ``conn``, inside its transaction.

    Batch statements go straight to asyncpg with array parameters: one prepared
    statement, one round trip, no per-row work in SQLAlchemy.
    """
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    if driver is None:  # invalidated under us (a dropped connection)
        raise exc.DatabaseUnavailableError("database connection lost")
    if not driver.is_in_transaction():
        # SQLAlchemy's asyncpg adapter sends BEGIN lazily, with its own first
        # statement: a batch that talks only to asyncpg would otherwise run in
        # autocommit, one statement at a time. A statement through SQLAlchemy
        # opens the transaction that engine.begin() commits or rolls back.
        await conn.exec_driver_sql("SELECT 1")
    return driver


async def create_database_if_missing(database_url: str) -> bool:
    """Create the database named in ``database_url``; True if it was created."""
    url = make_url(database_url)
    name = url.database
    if not name:
        raise exc.DatabaseUnavailableError("DATABASE_URL names no database")
    admin = url.set(drivername="postgresql", database="postgres").render_as_string(
        hide_password=False
    )
    try:
        conn = await asyncpg.connect(admin, timeout=10)
    except (OSError, asyncpg.PostgresError, TimeoutError) as error:
        raise translate(error) from error
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists:
            return False
        quoted = '"' + name.replace('"', '""') + '"'
        try:
            await conn.execute(f"CREATE DATABASE {quoted}")
        except asyncpg.DuplicateDatabaseError:
            return False  # created by a concurrent caller
        log.info("database created", extra={"database": name})
        return True
    finally:
        await conn.close()
