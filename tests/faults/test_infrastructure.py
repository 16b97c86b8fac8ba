"""The fault suite's own pieces work: cluster, Redis, proxy, worker processes, crash
points, and the database timeouts a stalled network relies on."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import time
import uuid
from datetime import UTC, datetime

import asyncpg
import httpx
import pytest
from sqlalchemy import text

from tests.faults.conftest import FAULT_REDELIVERY
from tests.faults.postgres import PostgresCluster, free_port
from tests.faults.processes import Processes, worker_environment
from tests.faults.proxy import TcpProxy
from tests.faults.redis_server import RedisServer
from tests.support.topics import REGISTRY
from worker import exceptions as exc
from worker.config import Settings
from worker.pipeline.crash_points import PIPELINE_POINTS, CrashPoint, CrashPoints
from worker.pubsub.client import PubSub, PubsubMessage
from worker.storage.database import create_engine, driver_connection, transaction, translate

SIGKILLED = -signal.SIGKILL
# How asyncpg reports a session the server ended under it: which one depends on whether
# the FATAL message arrived while the connection was idle (an internal protocol error).
CONNECTION_GONE = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
)


def feedback(insight_id: str, rating: int = 4) -> bytes:
    payload = {
        "insight_id": insight_id,
        "user_id": "u1",
        "rating": rating,
        "occurred_at": datetime.now(UTC).isoformat(),
    }
    return json.dumps(payload).encode()


async def feedback_rows(cluster: PostgresCluster, database: str, insight_id: str) -> int:
    conn = await cluster.connect(database)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM insight_feedback WHERE insight_id = $1", insight_id
        )
        return count
    finally:
        await conn.close()


async def wait_rows(
    cluster: PostgresCluster, database: str, insight_id: str, timeout_s: float
) -> int:
    deadline = time.monotonic() + timeout_s
    while (rows := await feedback_rows(cluster, database, insight_id)) == 0:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    return rows


# -- PostgreSQL ------------------------------------------------------------------------


async def test_cluster_survives_an_immediate_restart_with_what_was_committed(
    fault_postgres: PostgresCluster, fault_database: str
) -> None:
    setup = await fault_postgres.connect(fault_database)
    await setup.execute("CREATE TABLE t (v int)")
    await setup.execute("INSERT INTO t VALUES (1)")
    open_tx = await fault_postgres.connect(fault_database)
    await open_tx.execute("BEGIN; INSERT INTO t VALUES (2)")

    started = time.monotonic()
    await fault_postgres.restart_immediate()
    restart_s = time.monotonic() - started

    # The server crashed under both sessions: they are gone, with the open transaction.
    for conn in (setup, open_tx):
        with pytest.raises(CONNECTION_GONE):
            await conn.fetchval("SELECT 1")
        conn.terminate()
    after = await fault_postgres.connect(fault_database)
    try:
        assert await after.fetch("SELECT v FROM t") == [(1,)]
    finally:
        await after.close()
    assert restart_s < 10, f"immediate restart took {restart_s:.1f}s"


async def test_a_session_mid_transaction_is_terminated(
    fault_postgres: PostgresCluster, fault_database: str
) -> None:
    idle = await fault_postgres.connect(fault_database)
    writer = await fault_postgres.connect(fault_database)
    try:
        await writer.execute("CREATE TABLE t (v int)")
        await writer.execute("BEGIN; INSERT INTO t VALUES (1)")
        terminated = await fault_postgres.terminate_mid_batch(fault_database, timeout_s=5)
        assert terminated == [writer.get_server_pid()]
        with pytest.raises(CONNECTION_GONE):
            await writer.fetchval("SELECT 1")
        # However asyncpg reports it, the worker's boundary calls it transient.
        assert isinstance(
            translate(asyncpg.InternalClientError("lost")), exc.DatabaseUnavailableError
        )
        # The idle session (no uncommitted write) was spared.
        assert await idle.fetchval("SELECT count(*) FROM t") == 0
        assert await fault_postgres.terminate_backends(fault_database) == [idle.get_server_pid()]
    finally:
        idle.terminate()
        writer.terminate()


async def test_guard_commits_reaches_before_commit_only_through_the_copy(
    fault_postgres: PostgresCluster, fault_database: str
) -> None:
    class Killed(Exception):
        pass

    def kill() -> None:
        raise Killed

    engine = create_engine(Settings(database_url=fault_postgres.url(fault_database)))
    points = CrashPoints(CrashPoint.BEFORE_COMMIT, on_hit=2, kill=kill)
    guarded = points.guard_commits(engine)
    try:
        async with transaction(engine) as conn:
            await conn.execute(text("CREATE TABLE t (v int)"))
        assert points.hits == 0  # the original engine is not guarded
        async with transaction(guarded) as conn:
            await conn.execute(text("INSERT INTO t VALUES (1)"))
        assert points.hits == 1
        with pytest.raises(Killed):
            async with transaction(guarded) as conn:
                await (await driver_connection(conn)).execute("INSERT INTO t VALUES (2)")
        # Reached before COMMIT: the second row was never committed.
        async with transaction(engine) as conn:
            assert (await conn.execute(text("SELECT array_agg(v) FROM t"))).scalar() == [1]
    finally:
        await engine.dispose()


# -- Redis -----------------------------------------------------------------------------


async def test_redis_stops_and_starts_on_the_same_port(fault_redis: RedisServer) -> None:
    assert await fault_redis.ping()
    port = fault_redis.port
    await fault_redis.stop()
    assert not fault_redis.running and not await fault_redis.ping()
    await fault_redis.start()
    assert fault_redis.port == port and await fault_redis.ping()
    await fault_redis.stop(kill=True)
    assert not await fault_redis.ping()
    await fault_redis.start()
    assert await fault_redis.ping()


# -- the proxy -------------------------------------------------------------------------


async def test_proxy_forwards_pauses_and_resumes(
    fault_postgres: PostgresCluster, fault_database: str, postgres_proxy: TcpProxy
) -> None:
    dsn = f"postgresql://postgres@127.0.0.1:{postgres_proxy.port}/{fault_database}"
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        postgres_proxy.pause()
        query = asyncio.create_task(conn.fetchval("SELECT 2"))
        connecting = asyncio.create_task(asyncpg.connect(dsn, timeout=30))
        await asyncio.sleep(1.0)
        assert not query.done(), "a query completed through a paused proxy"
        assert not connecting.done(), "a connection was made through a paused proxy"
        postgres_proxy.resume()
        assert await asyncio.wait_for(query, 5) == 2
        late = await asyncio.wait_for(connecting, 5)
        assert await late.fetchval("SELECT 3") == 3
        await late.close()
        postgres_proxy.drop_connections()
        with pytest.raises(CONNECTION_GONE):
            await conn.fetchval("SELECT 4")
    finally:
        conn.terminate()
    assert postgres_proxy.connections_accepted == 2


async def test_a_stalled_network_fails_the_batch_in_time_and_the_pool_recovers(
    fault_postgres: PostgresCluster, fault_database: str, postgres_proxy: TcpProxy
) -> None:
    settings = Settings(
        database_url=fault_postgres.url(fault_database, port=postgres_proxy.port),
        database_pool_size=1,
        database_max_overflow=0,
        database_connect_timeout_s=1.0,
        database_command_timeout_s=2.0,
        database_statement_timeout_s=2.0,
    )
    engine = create_engine(settings)
    try:

        async def backend_pid() -> int:
            async with transaction(engine) as conn:
                pid: int = await (await driver_connection(conn)).fetchval("SELECT pg_backend_pid()")
                return pid

        first = await backend_pid()
        async with transaction(engine) as conn:
            driver = await driver_connection(conn)
            assert await driver.fetchval("SHOW statement_timeout") == "2s"
        postgres_proxy.pause()
        started = time.monotonic()
        with pytest.raises(exc.DatabaseUnavailableError):  # transient: the pipeline nacks
            async with transaction(engine) as conn:
                await (await driver_connection(conn)).execute("SELECT 1")
        failed_after_s = time.monotonic() - started
        # The command timeout, then SQLAlchemy's 2 s for closing the connection it
        # discards; not a second command timeout waiting for the cancellation.
        assert failed_after_s < 2.0 + 2.0 + 1.0, failed_after_s
        # While stalled, a new connection fails at the connect timeout.
        started = time.monotonic()
        with pytest.raises(exc.DatabaseUnavailableError):
            await backend_pid()
        assert time.monotonic() - started < 1.0 + 1.0
        postgres_proxy.resume()
        # The timed-out connection was discarded: a new session serves the next batch.
        assert await backend_pid() != first
    finally:
        await engine.dispose()


def test_timeouts_come_from_the_environment_and_are_never_infinite() -> None:
    settings = Settings.from_env(
        {
            "DATABASE_CONNECT_TIMEOUT": "2.5",
            "DATABASE_COMMAND_TIMEOUT": "7",
            "DATABASE_STATEMENT_TIMEOUT": "8",
        }
    )
    assert (
        settings.database_connect_timeout_s,
        settings.database_command_timeout_s,
        settings.database_statement_timeout_s,
    ) == (2.5, 7.0, 8.0)
    defaults = Settings.from_env({})
    assert (
        defaults.database_connect_timeout_s,
        defaults.database_command_timeout_s,
        defaults.database_statement_timeout_s,
    ) == (10.0, 30.0, 30.0)
    for variable in (
        "DATABASE_CONNECT_TIMEOUT",
        "DATABASE_COMMAND_TIMEOUT",
        "DATABASE_STATEMENT_TIMEOUT",
    ):
        for bad in ("0", "-1", "inf", "nan", "soon"):
            with pytest.raises(ValueError, match=variable):
                Settings.from_env({variable: bad})


# -- worker processes and crash points -------------------------------------------------


async def test_a_worker_process_starts_and_is_killed(
    fault_settings: Settings, processes: Processes
) -> None:
    worker = await processes.start_worker(worker_environment(fault_settings))
    assert worker.alive and worker.logged("worker started")
    assert not worker.logged("crash point armed: this process will SIGKILL itself (tests only)")
    assert await worker.kill() == SIGKILLED


async def test_a_push_server_process_starts_and_is_killed(
    fault_settings: Settings, processes: Processes
) -> None:
    port = free_port()
    server = await processes.start_server(worker_environment(fault_settings), port)
    async with httpx.AsyncClient(timeout=5) as client:
        assert (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
    assert await server.kill() == SIGKILLED


@pytest.mark.parametrize("point", PIPELINE_POINTS)
async def test_a_crash_point_kills_the_worker_where_it_says(
    point: CrashPoint,
    fault_postgres: PostgresCluster,
    fault_database: str,
    fault_settings: Settings,
    fault_pubsub: PubSub,
    processes: Processes,
) -> None:
    insight = f"i-{uuid.uuid4().hex[:8]}"
    # Feedback only: the invalidation stays on its subscription, where the test reads it.
    env = worker_environment(fault_settings, crash_at=point.value)
    worker = await processes.start_worker(env, "--only", "feedback")
    assert worker.logged("crash point armed: this process will SIGKILL itself (tests only)")
    await fault_pubsub.publish(
        fault_pubsub.topic("feedback"), [PubsubMessage(data=feedback(insight))], timeout_s=10
    )
    assert await worker.wait_exit(60) == SIGKILLED
    [reached] = worker.logged("crash point reached, killing the process")
    assert reached["crash_point"] == point.value

    committed = await feedback_rows(fault_postgres, fault_database, insight)
    assert committed == (0 if point is CrashPoint.BEFORE_COMMIT else 1)
    invalidations = await fault_pubsub.pull(
        fault_pubsub.subscription(REGISTRY["cache-invalidation"].subscription), 10, timeout_s=2
    )
    assert len(invalidations) == (1 if point is CrashPoint.AFTER_PUBLISH else 0)

    if point is CrashPoint.BEFORE_COMMIT:
        # Never acked: the message comes back after the shortened ack deadline and a
        # worker without a crash point commits it.
        again = await processes.start_worker(
            worker_environment(fault_settings), "--only", "feedback", name="worker-2"
        )
        rows = await wait_rows(
            fault_postgres, fault_database, insight, FAULT_REDELIVERY.ack_deadline_s + 20
        )
        assert rows == 1
        assert await again.terminate() == 0


async def test_a_crash_point_kills_the_push_server_too(
    fault_postgres: PostgresCluster,
    fault_database: str,
    fault_settings: Settings,
    processes: Processes,
) -> None:
    insight = f"i-{uuid.uuid4().hex[:8]}"
    port = free_port()
    # One process: the supervisor of several would start a killed one again.
    env = worker_environment(
        fault_settings, crash_at=CrashPoint.AFTER_COMMIT.value, WORKER_PROCESSES="1"
    )
    server = await processes.start_server(env, port)
    envelope = {
        "message": {
            "data": base64.b64encode(feedback(insight)).decode(),
            "messageId": "1",
            "publishTime": datetime.now(UTC).isoformat(),
        },
        "subscription": "projects/p/subscriptions/feedback-worker",
    }
    async with httpx.AsyncClient(timeout=30) as client:
        # The server dies before answering: the push is never acknowledged.
        with pytest.raises(httpx.TransportError):
            await client.post(f"http://127.0.0.1:{port}/push/feedback", json=envelope)
    assert await server.wait_exit(30) == SIGKILLED
    assert server.logged("crash point reached, killing the process")
    assert await feedback_rows(fault_postgres, fault_database, insight) == 1


async def test_a_bad_crash_point_refuses_to_start(
    fault_settings: Settings, processes: Processes
) -> None:
    env = worker_environment(fault_settings, crash_at="befor_commit", PORT="0")
    child = await processes.spawn("worker", ["run"], env)
    assert await child.wait_exit(60) == 2
    assert "unknown crash point 'befor_commit'" in child.log_tail()
