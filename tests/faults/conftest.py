"""Fixtures of the fault tests: a PostgreSQL, a Redis and a Pub/Sub project of their own.

- ``fault_postgres`` (per module): a throwaway cluster (initdb ~0.4 s, start ~0.1 s)
  with a migrated template database; ``fault_database`` (per test) is a fresh copy.
- ``fault_redis`` (per test): a redis-server on a free port.
- ``fault_settings`` (per test): worker ``Settings`` for those two plus a Pub/Sub
  project of the test's own on the emulator, its topology applied with
  ``FAULT_REDELIVERY`` (what a killed worker held comes back in seconds).
- ``processes`` (per test): starts worker subprocesses, kills the survivors at the end.
- ``postgres_proxy`` (per test): a pausable TCP proxy in front of ``fault_postgres``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from tests.faults.postgres import PostgresCluster
from tests.faults.processes import Processes
from tests.faults.proxy import TcpProxy
from tests.faults.redis_server import RedisServer
from tests.support.topics import REGISTRY
from worker.config import Settings
from worker.pubsub import topology
from worker.pubsub.client import PubSub

TEMPLATE_DATABASE = "faults_template"

# Ack deadline 10 s (Pub/Sub's minimum) instead of 60 s, retry backoff 1-10 s instead
# of 10-600 s; the dead-letter policy stays CONTRACT.md's 5 attempts.
FAULT_REDELIVERY = topology.Redelivery(
    ack_deadline_s=10, min_retry_backoff_s=1, max_retry_backoff_s=10
)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def fault_postgres() -> AsyncIterator[PostgresCluster]:
    """A running throwaway cluster with the migrated template ``faults_template``."""
    try:
        cluster = await PostgresCluster.create()
    except RuntimeError as error:
        pytest.fail(f"cannot create a throwaway PostgreSQL cluster: {error}", pytrace=False)
    try:
        await cluster.start()
        await cluster.create_database(TEMPLATE_DATABASE)
        await cluster.migrate_template(TEMPLATE_DATABASE)
        yield cluster
    finally:
        await cluster.destroy()


@pytest_asyncio.fixture(loop_scope="session")
async def fault_database(fault_postgres: PostgresCluster) -> AsyncIterator[str]:
    """A fresh migrated database on ``fault_postgres``; its name."""
    if not fault_postgres.running:  # a test before this one left it stopped
        await fault_postgres.start()
    name = f"faults_{uuid.uuid4().hex[:12]}"
    await fault_postgres.create_database(name, template=TEMPLATE_DATABASE)
    yield name
    if not fault_postgres.running:
        await fault_postgres.start()
    await fault_postgres.drop_database(name)


@pytest_asyncio.fixture(loop_scope="session")
async def fault_redis() -> AsyncIterator[RedisServer]:
    server = RedisServer()
    try:
        await server.start()
    except RuntimeError as error:
        pytest.fail(f"cannot start a throwaway redis-server: {error}", pytrace=False)
    try:
        yield server
    finally:
        await server.stop(kill=True)


@pytest_asyncio.fixture(loop_scope="session")
async def fault_settings(
    fault_postgres: PostgresCluster,
    fault_database: str,
    fault_redis: RedisServer,
    pubsub_emulator: str,
) -> AsyncIterator[Settings]:
    """Worker settings on the throwaway services and a fresh emulator project."""
    settings = dataclasses.replace(
        Settings(),
        database_url=fault_postgres.url(fault_database),
        redis_url=fault_redis.url(),
        google_cloud_project=f"faults-{uuid.uuid4().hex[:12]}",
        pubsub_emulator_host=pubsub_emulator,
        # Never infinite, and short enough that a stalled network fails a batch within
        # seconds (CONTRACT.md: a timeout is transient, nacked).
        database_connect_timeout_s=3.0,
        database_command_timeout_s=5.0,
        database_statement_timeout_s=5.0,
    )
    await topology.apply(settings, REGISTRY, redelivery=FAULT_REDELIVERY)
    yield settings
    # The emulator keeps every message of a subscription in memory until it is deleted.
    with contextlib.suppress(Exception):
        await topology.delete(settings, REGISTRY)


@pytest_asyncio.fixture(loop_scope="session")
async def fault_pubsub(fault_settings: Settings) -> AsyncIterator[PubSub]:
    """A data-plane client (publish, pull) on the test's project."""
    client = PubSub(fault_settings)
    try:
        yield client
    finally:
        await client.close()


@pytest_asyncio.fixture(loop_scope="session")
async def processes() -> AsyncIterator[Processes]:
    started = Processes()
    try:
        yield started
    finally:
        await started.kill_all()


@pytest.fixture
def postgres_proxy(fault_postgres: PostgresCluster) -> Iterator[TcpProxy]:
    """A started proxy to ``fault_postgres``; point a worker at it with
    ``fault_postgres.url(database, port=postgres_proxy.port)``."""
    with TcpProxy(fault_postgres.port) as proxy:
        yield proxy
