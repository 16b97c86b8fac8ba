"""What a database holds, as backups record and check it: tables, rows, versions.

Maintenance talks to PostgreSQL on connections of its own (asyncpg, outside the
ingestion pool): a dump's snapshot transaction lives as long as the dump, and a
count over a large table takes longer than an ingestion statement may.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from sqlalchemy import make_url

from worker.exceptions import MaintenanceError
from worker.storage.database import translate

# Bounded, never infinite, but far above what counting or dumping a table takes.
MAINTENANCE_STATEMENT_TIMEOUT = "2h"

_TABLES = """
SELECT n.nspname AS schema, c.relname AS name
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
ORDER BY 1, 2
"""


def _libpq(database_url: str, database: str | None = None) -> str:
    url = make_url(database_url).set(drivername="postgresql")
    if database is not None:
        url = url.set(database=database)
    return url.render_as_string(hide_password=False)


@asynccontextmanager
async def connect(database_url: str, database: str | None = None) -> AsyncIterator[Any]:
    """A maintenance connection to ``database_url`` (or its server's ``database``)."""
    try:
        conn = await asyncpg.connect(
            _libpq(database_url, database),
            timeout=10,
            server_settings={
                "statement_timeout": MAINTENANCE_STATEMENT_TIMEOUT,
                "application_name": "utxoiq-worker maintenance",
            },
        )
    except (OSError, asyncpg.PostgresError, TimeoutError) as error:
        raise translate(error) from error
    try:
        yield conn
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        raise translate(error) from error
    finally:
        await conn.close()


@asynccontextmanager
async def exported_snapshot(conn: Any) -> AsyncIterator[str]:
    """A read-only repeatable-read transaction on ``conn`` and its exported snapshot id.

    pg_dump given ``--snapshot`` sees exactly what ``conn`` sees while this is open,
    so counts taken here describe the dump exactly.
    """
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        yield str(await conn.fetchval("SELECT pg_export_snapshot()"))


def _table_name(schema: str, name: str) -> str:
    return name if schema == "public" else f"{schema}.{name}"


def _quoted(schema: str, name: str) -> str:
    def quote(identifier: str) -> str:
        return '"' + identifier.replace('"', '""') + '"'

    return f"{quote(schema)}.{quote(name)}"


async def count_rows(conn: Any) -> dict[str, int]:
    """Rows per table (every leaf table: each metrics partition on its own)."""
    counts: dict[str, int] = {}
    for row in await conn.fetch(_TABLES):
        rows = await conn.fetchval(f"SELECT count(*) FROM {_quoted(row['schema'], row['name'])}")
        counts[_table_name(row["schema"], row["name"])] = int(rows)
    return counts


async def server_version_num(conn: Any) -> int:
    return int(await conn.fetchval("SELECT current_setting('server_version_num')"))


async def server_version(conn: Any) -> str:
    return str(await conn.fetchval("SELECT current_setting('server_version')"))


async def alembic_revision(conn: Any) -> str | None:
    """The schema's Alembic revision; None if the database was never migrated."""
    if await conn.fetchval("SELECT to_regclass('public.alembic_version')") is None:
        return None
    value = await conn.fetchval("SELECT version_num FROM alembic_version")
    return None if value is None else str(value)


async def table_count(conn: Any) -> int:
    """How many tables the database holds (0: empty, safe to restore into)."""
    return len(await conn.fetch(_TABLES))


def _quote_database(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def create_database(database_url: str, name: str) -> None:
    async with connect(database_url, "postgres") as admin:
        await admin.execute(f"CREATE DATABASE {_quote_database(name)}")


async def ensure_database(database_url: str, name: str) -> None:
    async with connect(database_url, "postgres") as admin:
        if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await admin.execute(f"CREATE DATABASE {_quote_database(name)}")


async def drop_database(database_url: str, name: str, *, force: bool = True) -> None:
    """Drop ``name`` if it exists (``force``: even while something is connected)."""
    option = " WITH (FORCE)" if force else ""
    async with connect(database_url, "postgres") as admin:
        await admin.execute(f"DROP DATABASE IF EXISTS {_quote_database(name)}{option}")


async def databases_like(database_url: str, prefix: str) -> list[str]:
    """Databases whose name starts with ``prefix`` (scratch databases left behind)."""
    async with connect(database_url, "postgres") as admin:
        rows = await admin.fetch(
            "SELECT datname FROM pg_database WHERE starts_with(datname, $1) ORDER BY 1", prefix
        )
    return [str(row["datname"]) for row in rows]


def database_name(database_url: str) -> str:
    name = make_url(database_url).database
    if not name:
        raise MaintenanceError(f"DATABASE_URL names no database: {database_url!r}")
    return name
