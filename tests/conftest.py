"""Shared fixtures: a real PostgreSQL, one migrated template, one database per test.

The template is migrated once per session (``utxoiq_test_template``); every test that
asks for ``database_url`` gets its own ``CREATE DATABASE ... TEMPLATE`` copy, dropped
afterwards. A missing PostgreSQL fails the run: it never becomes a skip.
"""

from __future__ import annotations

import dataclasses
import os
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine

import handlers.metrics
from tests.support.topics import REGISTRY
from worker.config import Settings
from worker.pubsub import topology
from worker.pubsub.client import PubSub
from worker.read.service import DatabaseService
from worker.storage.database import create_engine
from worker.storage.migrate import upgrade

# One template per pytest process: two runs on one server must not drop each other's.
TEMPLATE_PREFIX = "utxoiq_test_template_"
TEMPLATE_DATABASE = f"{TEMPLATE_PREFIX}{os.getpid()}"
TEST_DATABASE_PREFIX = "utxoiq_test_"


def quote_ident(name: str) -> str:
    """A PostgreSQL identifier, quoted (database names cannot be bind parameters)."""
    return '"' + name.replace('"', '""') + '"'


def base_settings() -> Settings:
    """Settings from the environment (DATABASE_URL, ...), defaults otherwise."""
    return Settings.from_env()


def url_for(database: str, settings: Settings | None = None) -> str:
    """The SQLAlchemy URL of ``database`` on the server of DATABASE_URL."""
    url: URL = make_url((settings or base_settings()).database_url)
    return url.set(database=database).render_as_string(hide_password=False)


def admin_dsn(settings: Settings | None = None) -> str:
    """A plain asyncpg DSN to the ``postgres`` maintenance database of that server."""
    url: URL = make_url((settings or base_settings()).database_url)
    return url.set(drivername="postgresql", database="postgres").render_as_string(
        hide_password=False
    )


async def admin_connect() -> asyncpg.Connection:
    return await asyncpg.connect(admin_dsn(), timeout=10)


async def drop_database(conn: asyncpg.Connection, name: str) -> None:
    """Drop ``name`` if it exists, even if it is a template or has sessions."""
    exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
    if not exists:
        return
    await conn.execute(f"ALTER DATABASE {quote_ident(name)} IS_TEMPLATE false")
    await conn.execute(f"DROP DATABASE {quote_ident(name)} WITH (FORCE)")


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def postgres_available() -> None:
    """PostgreSQL must answer; if it does not, the whole run fails, loudly."""
    dsn = admin_dsn()
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError) as error:
        pytest.fail(
            f"PostgreSQL is not reachable at {make_url(dsn).render_as_string()} "
            f"(set DATABASE_URL or start the local stack): {error!r}",
            pytrace=False,
        )
    try:
        version = await conn.fetchval("SHOW server_version_num")
        assert int(version) >= 150000, f"PostgreSQL 15 or later is required, got {version}"
    finally:
        await conn.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _drop_orphan_templates(conn: asyncpg.Connection) -> None:
    """Templates left by runs that died before their teardown."""
    names = await conn.fetch(
        "SELECT datname FROM pg_database WHERE datname LIKE $1", TEMPLATE_PREFIX + "%"
    )
    for record in names:
        suffix = record["datname"].removeprefix(TEMPLATE_PREFIX)
        if suffix.isdigit() and not _alive(int(suffix)):
            await drop_database(conn, record["datname"])


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def template_database(postgres_available: None) -> AsyncIterator[str]:
    """Migrate this run's template database once; yields its name."""
    conn = await admin_connect()
    try:
        await _drop_orphan_templates(conn)
        await drop_database(conn, TEMPLATE_DATABASE)
        await conn.execute(f"CREATE DATABASE {quote_ident(TEMPLATE_DATABASE)}")
        settings = dataclasses.replace(base_settings(), database_url=url_for(TEMPLATE_DATABASE))
        # upgrade() disposes every engine it creates (and env.py uses a NullPool), so
        # no session is left behind; CREATE DATABASE ... TEMPLATE needs none open.
        await upgrade(settings, REGISTRY)
        leftover = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1", TEMPLATE_DATABASE
        )
        assert leftover == 0, f"{leftover} sessions still open on the template after migrating"
        # No connections from now on: a stray one would make every copy fail.
        await conn.execute(
            f"ALTER DATABASE {quote_ident(TEMPLATE_DATABASE)}"
            " IS_TEMPLATE true ALLOW_CONNECTIONS false"
        )
    finally:
        await conn.close()
    yield TEMPLATE_DATABASE
    # A new connection: a test may have restarted PostgreSQL (tests/integration/test_faults).
    conn = await admin_connect()
    try:
        await drop_database(conn, TEMPLATE_DATABASE)
    finally:
        await conn.close()


@pytest_asyncio.fixture(loop_scope="session")
async def database_url(template_database: str) -> AsyncIterator[str]:
    """A fresh, migrated database of this test's own; its SQLAlchemy URL."""
    name = f"{TEST_DATABASE_PREFIX}{uuid.uuid4().hex[:12]}"
    conn = await admin_connect()
    try:
        await conn.execute(
            f"CREATE DATABASE {quote_ident(name)} TEMPLATE {quote_ident(template_database)}"
        )
    finally:
        await conn.close()
    yield url_for(name)
    conn = await admin_connect()  # a new one: PostgreSQL may have been restarted meanwhile
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
    finally:
        await conn.close()


@pytest.fixture
def settings(database_url: str) -> Settings:
    return dataclasses.replace(base_settings(), database_url=database_url)


@pytest_asyncio.fixture(loop_scope="session")
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def db(engine: AsyncEngine) -> DatabaseService:
    return DatabaseService(engine, None)


@pytest.fixture(scope="session")
def pubsub_emulator() -> str:
    """The emulator's host:port. Unset or unreachable fails the run: never a skip."""
    host = os.environ.get("PUBSUB_EMULATOR_HOST")
    if not host:
        pytest.fail(
            "PUBSUB_EMULATOR_HOST is not set: run the tests with `make test`, or start the "
            "emulator and export PUBSUB_EMULATOR_HOST=host:port",
            pytrace=False,
        )
    try:
        with urllib.request.urlopen(f"http://{host}/", timeout=10) as response:
            body = response.read()
    except (OSError, urllib.error.URLError) as error:
        pytest.fail(f"the Pub/Sub emulator at {host} is not reachable: {error!r}", pytrace=False)
    assert body.strip() == b"Ok", f"{host} does not answer like the Pub/Sub emulator: {body!r}"
    return host


@pytest_asyncio.fixture(loop_scope="session")
async def pubsub_settings(settings: Settings, pubsub_emulator: str) -> Settings:
    """``settings`` on a Pub/Sub project of this test's own, its topology applied.

    Every test starts with empty topics and subscriptions.
    """
    fresh = dataclasses.replace(
        settings,
        google_cloud_project=f"test-{uuid.uuid4().hex[:12]}",
        pubsub_emulator_host=pubsub_emulator,
    )
    await topology.apply(fresh, REGISTRY)
    return fresh


@pytest_asyncio.fixture(loop_scope="session")
async def pubsub(pubsub_settings: Settings) -> AsyncIterator[PubSub]:
    """A data-plane client on the test's project."""
    client = PubSub(pubsub_settings)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture(params=["one-statement", "copy"])
def metrics_write_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a metrics test through each write path: small batches go in one statement,
    large ones by claim plus COPY (``handlers.metrics.COPY_FROM_ROWS``)."""
    path: str = request.param
    monkeypatch.setattr(handlers.metrics, "COPY_FROM_ROWS", 1 if path == "copy" else 10**9)
    return path
