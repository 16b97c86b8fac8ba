"""Fault scenarios 2, 3 and 6: PostgreSQL crashes, Redis goes away, the network stalls.

Each one publishes a workload (5% republished duplicates, 2% poison, shuffled) at a
steady rate to one worker subprocess, injects its faults while phase 1 is published,
and ends with the verdict of ``tests/faults/scenario.py``: 0 lost, 0 applied twice,
every poison in its dead-letter topic and nothing else there, the Redis invariant
once idle. The worker is never restarted: it must recover by itself.

``FAULT_MESSAGES`` and ``FAULT_SEED`` set the size and seed (``make soak`` loops the
scenarios with bigger sizes and other seeds). The faults follow a fixed timeline in
seconds; the publish rate is derived from the size so that phase 1 spans it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from tests.faults.checks import compare_database
from tests.faults.postgres import PostgresCluster
from tests.faults.processes import Processes, WorkerProcess, worker_environment
from tests.faults.proxy import TcpProxy
from tests.faults.redis_server import RedisServer
from tests.faults.scenario import Scenario
from tests.support.emulator import pull_all
from tests.support.topics import REGISTRY
from worker.config import Settings
from worker.pubsub.client import PubSub
from worker.read.cached import CacheService
from worker.read.service import DatabaseService
from worker.storage.cache import Cache, create_redis
from worker.storage.database import create_engine

T = TypeVar("T")

MESSAGES = int(os.environ.get("FAULT_MESSAGES", "2400"))
SEED = int(os.environ.get("FAULT_SEED", "20261121"))

NACKED = "batch not committed, nacked for redelivery"
HOLDING = "redis unavailable, holding invalidations"
# How a stalled network shows in that warning's ``error``: the command timeout
# ("database unreachable: ..." from a TimeoutError) or a connect that timed out.
STALL_ERRORS = ("unreachable", "timeout", "timed out")
# A read with Redis down costs at most a failed connect (0.5 s timeout) and a database
# query, and the next second skips Redis altogether: never seconds.
DEGRADED_READ_MAX_S = 2.0


def rate_for(phase1_s: float) -> float:
    """The publish rate that spreads phase 1 of ``MESSAGES`` over ``phase1_s``."""
    return MESSAGES / phase1_s


def assert_survived(worker: WorkerProcess) -> None:
    assert worker.alive, f"the worker exited ({worker.returncode}):\n{worker.log_tail()}"
    assert len(worker.logged("worker started")) == 1


def nacks(worker: WorkerProcess) -> list[dict[str, Any]]:
    return worker.logged(NACKED)


async def agreed_read(
    database: Callable[[], Awaitable[T]], through_cache: Callable[[], Awaitable[T]]
) -> tuple[T, T, float]:
    """A read through the cache bracketed by two database reads that agree (ingestion
    goes on meanwhile, so a value may move between them; then try again).
    Returns (database value, value read through the cache, seconds the read took)."""
    for _ in range(50):
        before = await database()
        started = time.monotonic()
        got = await through_cache()
        took_s = time.monotonic() - started
        if await database() == before:
            return before, got, took_s
        await asyncio.sleep(0.05)
    raise AssertionError("the value never held still for one read")


# -- scenario 2: PostgreSQL crashes ----------------------------------------------------

# The backend is terminated first, in steady state: after a restart the worker pauses
# its pulls for up to 10 s (its backoff), and a batch in flight may be rare then. The
# second restart comes after that pause, so that it too hits batches in flight.
PG_PHASE1_S = 22.0
PG_TERMINATE_S = 3.0
PG_TERMINATE_WAIT_S = 10.0
PG_FIRST_RESTART_S = 6.0
PG_SECOND_RESTART_S = 18.0


@pytest.mark.timeout(240)
async def test_scenario_postgres_restarts_and_a_backend_killed_mid_batch(
    fault_postgres: PostgresCluster,
    fault_database: str,
    fault_settings: Settings,
    fault_pubsub: PubSub,
    processes: Processes,
) -> None:
    worker = await processes.start_worker(worker_environment(fault_settings))
    scenario = Scenario.create(
        "postgres-restarts", fault_settings, fault_pubsub, seed=SEED, messages=MESSAGES
    )
    async with scenario.reading(seed=SEED), scenario.publishing(rate_for(PG_PHASE1_S)):
        await scenario.at(PG_TERMINATE_S)
        terminated = await fault_postgres.terminate_mid_batch(
            fault_database, timeout_s=PG_TERMINATE_WAIT_S
        )
        assert terminated, (
            f"no batch caught between its first write and its COMMIT in"
            f" {PG_TERMINATE_WAIT_S} s:\n{worker.log_tail()}"
        )
        scenario.fault(f"backend terminated mid-batch (pid {terminated})")

        await scenario.at(PG_FIRST_RESTART_S)
        await fault_postgres.restart_immediate()
        scenario.fault("postgres restarted in immediate mode")

        await scenario.at(PG_SECOND_RESTART_S)
        await fault_postgres.restart_immediate()
        scenario.fault("postgres restarted in immediate mode")

    verdict = await scenario.verdict(applied_timeout_s=60)
    assert_survived(worker)
    verdict.assert_ok()
    # The faults reached the worker: at least the batch terminated mid-transaction.
    assert nacks(worker), worker.log_tail()


# -- scenario 3: Redis down for 30 s ---------------------------------------------------

REDIS_PHASE1_S = 42.0
REDIS_STOP_S = 4.0
REDIS_DOWN_S = 30.0


async def degraded_reads(settings: Settings, scenario: Scenario) -> list[float]:
    """With Redis down, reads through ``CacheService`` answer the database's current
    value without raising; the seconds each took."""
    engine = create_engine(settings)
    cache = Cache(create_redis(settings))
    db = DatabaseService(engine, None)
    reads = CacheService(cache, db)
    timings: list[float] = []
    try:
        expected = scenario.expected()
        assert expected.feedback and expected.jobs, "nothing published yet to read"
        insight = sorted(expected.feedback)[0][0]
        stored, cached, took_s = await agreed_read(
            lambda: db.get_feedback_stats(insight), lambda: reads.get_feedback_stats(insight)
        )
        assert cached == stored, (insight, cached, stored)
        timings.append(took_s)

        job_id = sorted(expected.jobs)[0]
        job, cached_job, took_s = await agreed_read(
            lambda: db.get_backfill_job(job_id), lambda: reads.get_backfill_job(job_id)
        )
        assert cached_job == job, (job_id, cached_job, job)
        timings.append(took_s)
    finally:
        await cache.close()
        await engine.dispose()
    return timings


@pytest.mark.timeout(240)
async def test_scenario_redis_down_for_30_s(
    fault_redis: RedisServer,
    fault_settings: Settings,
    fault_pubsub: PubSub,
    processes: Processes,
) -> None:
    worker = await processes.start_worker(worker_environment(fault_settings))
    scenario = Scenario.create(
        "redis-down", fault_settings, fault_pubsub, seed=SEED, messages=MESSAGES
    )
    dsn = fault_settings.database_url
    async with scenario.reading(seed=SEED), scenario.publishing(rate_for(REDIS_PHASE1_S)):
        await scenario.at(REDIS_STOP_S)
        await fault_redis.stop()
        scenario.fault("redis stopped")
        published_before = scenario.expected().counts()

        await scenario.at(REDIS_STOP_S + 2)
        early = (await compare_database(dsn, scenario.expected())).found

        await scenario.at(REDIS_STOP_S + 5)
        timings = await degraded_reads(fault_settings, scenario)
        assert max(timings) < DEGRADED_READ_MAX_S, timings

        await scenario.at(REDIS_STOP_S + REDIS_DOWN_S - 3)
        late = (await compare_database(dsn, scenario.expected())).found
        assert not fault_redis.running and not await fault_redis.ping()
        # Ingestion went on without Redis: rows kept arriving, and everything
        # published before the outage is stored (rows are never removed).
        assert sum(late.values()) > sum(early.values()), (early, late)
        for table, count in published_before.items():
            assert late[table] >= count, (table, published_before, late)

        await scenario.at(REDIS_STOP_S + REDIS_DOWN_S)
        await fault_redis.start()
        scenario.fault("redis started again (empty)")

    verdict = await scenario.verdict(applied_timeout_s=60)
    assert_survived(worker)
    # The updater held the invalidations of the outage and never gave them up:
    # nothing in the cache-invalidation dead-letter topic.
    invalidation_letters = await pull_all(
        fault_pubsub,
        REGISTRY["cache-invalidation"].dead_letter_subscription,
        timeout_s=5,
        quiet_s=2,
    )
    verdict.assert_ok()
    assert worker.logged(HOLDING), worker.log_tail()
    assert not invalidation_letters, [
        (letter.attributes, letter.data[:200]) for letter in invalidation_letters[:5]
    ]
    # Redis down is no transient failure of ingestion: no batch was nacked.
    assert not nacks(worker), nacks(worker)[:5]


# -- scenario 6: the network to PostgreSQL stalls for 20 s -----------------------------

STALL_PHASE1_S = 34.0
STALL_PAUSE_S = 5.0
STALL_FOR_S = 20.0


@pytest.mark.timeout(240)
async def test_scenario_network_to_postgres_stalls_for_20_s(
    fault_postgres: PostgresCluster,
    fault_database: str,
    fault_settings: Settings,
    fault_pubsub: PubSub,
    processes: Processes,
    postgres_proxy: TcpProxy,
) -> None:
    # Only the worker goes through the proxy; the reader and the checks do not.
    proxied = dataclasses.replace(
        fault_settings,
        database_url=fault_postgres.url(fault_database, port=postgres_proxy.port),
    )
    worker = await processes.start_worker(worker_environment(proxied))
    scenario = Scenario.create(
        "network-stall", fault_settings, fault_pubsub, seed=SEED, messages=MESSAGES
    )
    async with scenario.reading(seed=SEED), scenario.publishing(rate_for(STALL_PHASE1_S)):
        await scenario.at(STALL_PAUSE_S)
        postgres_proxy.pause()
        scenario.fault(f"network to postgres stalled (proxy paused {STALL_FOR_S:.0f} s)")
        await scenario.at(STALL_PAUSE_S + STALL_FOR_S)
        stalled = nacks(worker)
        postgres_proxy.resume()
        scenario.fault("network to postgres flows again")

    verdict = await scenario.verdict(applied_timeout_s=60)
    assert_survived(worker)
    verdict.assert_ok()
    # The timeouts fired while stalled: batches were nacked, naming the stall.
    assert stalled, f"no batch nacked during a {STALL_FOR_S} s stall:\n{worker.log_tail()}"
    errors = [str(entry.get("error", "")).lower() for entry in stalled]
    assert all(any(word in error for word in STALL_ERRORS) for error in errors), errors
