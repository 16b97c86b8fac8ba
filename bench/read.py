"""Scenario ``read``: ``get_feedback_stats`` of an insight with 10k feedback rows.

32 concurrent readers, p50 and p99 per call, cached (warm Redis key) and uncached
(what a miss costs: one row of ``insight_feedback_stats``, which triggers keep current;
also for a second insight of 1M rows, stored by one INSERT ... SELECT, since a miss
must cost the same whatever the insight's size; goal p99 <= 5 ms at both):
- in process: asyncio tasks calling ``CacheService.get_feedback_stats`` (cached) and
  ``DatabaseService.get_feedback_stats`` (uncached), each timed with perf_counter;
- over HTTP: ``utxoiq-worker serve`` in a subprocess, loaded by ``wrk`` (C, so the
  client adds no Python of its own) with 32 connections on
  ``GET /v1/feedback/{insight_id}/stats``. Uncached is a second server whose
  ``REDIS_URL`` points at a closed port: the cache is unavailable, so every read goes
  to the database (the designed fallback).

Baselines in the same run: a raw read of the same key on the connection the cache
reads on (an MGET of the key alone on ``worker.storage.redis_multiplexed``), by as
many tasks (goal: cached reads >= 0.5 of its rate), and, for scale, redis-py's pooled
GET of it; for the uncached read, its statement alone on a bare asyncpg pool (a
connection per task, no reset query on release), the least a read from PostgreSQL
costs on this machine; over HTTP, the same server doing no work (``bench.empty_push``,
on as many processes as ``serve``) under the same load.

Saturation p99 measures the queue in front of the read as much as the read: each
read is also offered a fixed rate for 10 s, half of what it sustained, with latency
from each read's due time (open loop, as wrk2 measures), and its baseline the same
rate. Over HTTP by ``bench.paced`` (``cached_http_paced_p99_ms`` and
``uncached_http_paced_p99_ms``, each against the do-nothing server at its rate); the
uncached read in process by as many tasks as readers (``uncached_in_process_paced_p99_ms``
against the bare asyncpg pool at the same rate).

Targets (from the issue): cached p99 <= 1 ms in process, <= 5 ms over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from bench import paced
from bench.common import fresh_database, percentile, report
from schemas.cache_keys import stats_cache_key
from schemas.feedback import FLAG_TYPES, FeedbackEvent, FeedbackStats
from worker.config import Settings
from worker.read.cached import CacheService
from worker.read.feedback import STATS_SQL
from worker.read.service import DatabaseService
from worker.storage.cache import create_cache, version_key
from worker.storage.database import create_engine

SCENARIO = "read"
ROWS = 10_000
BIG_ROWS = 1_000_000
INSERT_BATCH = 1000
INSERT_MANY = 100_000
READERS = 32
WARMUP_S = 0.5
IN_PROCESS_S = 3.0
WRK_DURATION_S = 5
WRK_WARMUP_S = 1
WRK_THREADS = 2
PACED_S = 10
PACED_SHARE = 0.5  # of the saturation rate
CLOSED_REDIS_URL = "redis://127.0.0.1:1/0"


# -- data ------------------------------------------------------------------------------


def _events(insight_id: str) -> list[FeedbackEvent]:
    occurred = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
    events = []
    for i in range(ROWS):
        flag = FLAG_TYPES[i % len(FLAG_TYPES)] if i % 7 == 0 else None
        events.append(
            FeedbackEvent(
                insight_id=insight_id,
                user_id=f"user-{i}",
                rating=i % 5 + 1,
                comment="useful" if i % 3 == 0 else None,
                flag_type=flag,
                flag_reason="bench" if flag else None,
                occurred_at=occurred,
            )
        )
    return events


# -- in process ------------------------------------------------------------------------


class _CountingDatabase(DatabaseService):
    """Counts the stats queries: a cached phase must not make any."""

    queries = 0

    async def get_feedback_stats(self, insight_id: str) -> FeedbackStats:
        self.queries += 1
        return await super().get_feedback_stats(insight_id)


async def _hammer(call: Callable[[], Awaitable[object]], duration_s: float) -> list[float]:
    """READERS tasks calling ``call`` back to back for ``duration_s``; latencies in ms."""
    latencies: list[float] = []
    deadline = time.perf_counter() + duration_s

    async def reader() -> None:
        while True:
            started = time.perf_counter()
            if started >= deadline:
                return
            await call()
            latencies.append((time.perf_counter() - started) * 1000)

    await asyncio.gather(*(reader() for _ in range(READERS)))
    return latencies


async def _pace(call: Callable[[], Awaitable[object]], rate_per_s: float) -> tuple[float, float]:
    """(p50 ms, p99 ms) of ``call`` offered ``rate_per_s`` for ``PACED_S`` by READERS tasks."""
    load = await paced.offer_calls(call, int(rate_per_s * PACED_S), rate_per_s, READERS)
    return load.p50_ms, load.p99_ms


async def _measure(call: Callable[[], Awaitable[object]]) -> tuple[float, float, float]:
    """(p50 ms, p99 ms, calls/s) after a discarded warm-up (pools filled, code hot)."""
    await _hammer(call, WARMUP_S)
    started = time.perf_counter()
    latencies = await _hammer(call, IN_PROCESS_S)
    rate = len(latencies) / (time.perf_counter() - started)
    return percentile(latencies, 50), percentile(latencies, 99), rate


# -- over HTTP -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@dataclass
class _Server:
    process: asyncio.subprocess.Process
    port: int
    log: deque[str]
    drain: asyncio.Task[None]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tail(self) -> str:
        return "".join(self.log)


SERVE = ("worker", "serve", "--host", "127.0.0.1")
CEILING = ("bench.empty_push",)
"""The same server answering 204 to everything, doing nothing (``bench.empty_push``)."""


async def _start_server(
    settings: Settings, redis_url: str, command: tuple[str, ...] = SERVE
) -> _Server:
    """``python -m *command`` on a free port; returns once /healthz answers."""
    port = _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": redis_url,
        "PORT": str(port),
        "LOG_LEVEL": "WARNING",
    }
    # Push auth stays on (the production default); nothing is pushed here.
    env.setdefault("PUSH_AUDIENCE", "https://bench.invalid/push")
    env.setdefault("PUSH_SERVICE_ACCOUNTS", "bench@bench.invalid")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        *command,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    log: deque[str] = deque(maxlen=40)

    async def drain() -> None:
        assert process.stderr is not None
        async for line in process.stderr:
            log.append(line.decode("utf-8", "replace"))

    server = _Server(process, port, log, asyncio.create_task(drain()))
    healthy = False
    try:
        deadline = time.monotonic() + 60
        while not healthy and process.returncode is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                status, _ = await asyncio.to_thread(_http_get, f"{server.base}/healthz")
                healthy = status in (200, 204)
            if not healthy:
                await asyncio.sleep(0.1)
    finally:
        if not healthy:
            await _stop_server(server)
    if not healthy:
        raise RuntimeError(f"`worker serve` did not become healthy; its log:\n{server.tail()}")
    return server


async def _stop_server(server: _Server) -> None:
    process = server.process
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=15)
        except TimeoutError:
            process.kill()
            await process.wait()
    with contextlib.suppress(asyncio.CancelledError):
        await server.drain


async def _ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for commands in (
        [["apt-get", "install", "-y", "-q", "wrk"]],
        [["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "wrk"]],
    ):
        for command in commands:
            process = await asyncio.create_subprocess_exec(
                *command,
                env=env,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            _, err = await process.communicate()
            if process.returncode != 0:
                sys.stderr.write(err.decode("utf-8", "replace")[-2000:])
                break
        found = shutil.which("wrk")
        if found:
            return found
    raise SystemExit(
        "scenario `read` needs wrk (the HTTP load generator) and `apt-get install -y wrk` "
        "failed; install it by hand and run again"
    )


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_LATENCY_LINE = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class WrkResult:
    p50_ms: float
    p99_ms: float
    requests_per_s: float


def parse_wrk(output: str) -> WrkResult:
    """p50, p99 (in ms) and requests/s from ``wrk --latency`` output."""
    marker = output.find("Latency Distribution")
    if marker < 0:
        raise RuntimeError(f"no latency distribution in wrk's output:\n{output}")
    found = {
        m.group(1): float(m.group(2)) * _UNIT_MS[m.group(3)]
        for m in _LATENCY_LINE.finditer(output[marker:])
    }
    rate = re.search(r"^Requests/sec:\s+([\d.]+)\s*$", output, re.MULTILINE)
    if "50" not in found or "99" not in found or rate is None:
        raise RuntimeError(f"could not parse wrk's output:\n{output}")
    for problem in ("Non-2xx or 3xx responses", "Socket errors"):
        if problem in output:
            raise RuntimeError(f"wrk reports {problem.lower()}:\n{output}")
    return WrkResult(found["50"], found["99"], float(rate.group(1)))


async def _wrk(wrk: str, url: str, duration_s: int) -> WrkResult:
    process = await asyncio.create_subprocess_exec(
        wrk,
        f"-t{WRK_THREADS}",
        f"-c{READERS}",
        f"-d{duration_s}s",
        "--latency",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout=duration_s + 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"wrk failed ({process.returncode}): {err.decode(errors='replace')}")
    return parse_wrk(out.decode("utf-8", "replace"))


async def _paced(server: _Server, path: str, rate_per_s: float) -> paced.PacedLoad:
    """``PACED_S`` of GET ``path`` at ``rate_per_s``; every request must be answered 2xx."""
    requests = [paced.get(path)] * int(rate_per_s * PACED_S)
    load = await paced.offer("127.0.0.1", server.port, requests, rate_per_s, READERS)
    if load.failed:
        raise RuntimeError(f"{load.failed} paced reads failed; log:\n{server.tail()}")
    return load


async def _http_phase(
    settings: Settings, cached: bool, insight_id: str, expected_ratings: int, wrk: str
) -> tuple[WrkResult, paced.PacedLoad]:
    """wrk's saturation figures, then half that rate offered by the paced client."""
    redis_url = settings.redis_url if cached else CLOSED_REDIS_URL
    server = await _start_server(settings, redis_url)
    try:
        path = f"/v1/feedback/{insight_id}/stats"
        url = server.base + path
        # One read to check the answer (and, on the cached server, that the key is warm).
        status, body = await asyncio.to_thread(_http_get, url)
        if status != 200 or json.loads(body)["total_ratings"] != expected_ratings:
            raise RuntimeError(f"unexpected answer {status} {body!r}; log:\n{server.tail()}")
        await _wrk(wrk, url, WRK_WARMUP_S)  # connections, pools, code paths; discarded
        result = await _wrk(wrk, url, WRK_DURATION_S)
        fixed = await _paced(server, path, result.requests_per_s * PACED_SHARE)
    finally:
        await _stop_server(server)
    # The cache logs each time it gives up on Redis (at most once a second): the
    # cached figures must be hits only, the uncached ones database reads only.
    bypassed = any("redis unavailable" in line for line in server.log)
    if cached and bypassed:
        raise RuntimeError(f"the cached server read through to the database:\n{server.tail()}")
    if not cached and not bypassed:
        raise RuntimeError(f"the uncached server never found Redis down:\n{server.tail()}")
    return result, fixed


async def _ceiling_phase(
    settings: Settings, wrk: str, paced_rates_per_s: list[float]
) -> tuple[WrkResult, list[paced.PacedLoad]]:
    """The do-nothing server, on as many processes as ``serve``, loaded like it: wrk,
    then each of the paced rates the reads were offered."""
    server = await _start_server(settings, settings.redis_url, CEILING)
    try:
        path = "/v1/feedback/ceiling/stats"
        await _wrk(wrk, server.base + path, WRK_WARMUP_S)
        result = await _wrk(wrk, server.base + path, WRK_DURATION_S)
        return result, [await _paced(server, path, rate) for rate in paced_rates_per_s]
    finally:
        await _stop_server(server)


async def _raw_database_read(
    settings: Settings, insight_id: str, paced_per_s: float
) -> tuple[float, float, float]:
    """(p99 ms, reads/s, p99 ms offered ``paced_per_s``) of the uncached read's statement
    alone, on an asyncpg pool of its own with a connection per reader: the least a read
    from PostgreSQL costs here. Its release skips asyncpg's reset query (a second round
    trip per read), which a single SELECT outside a transaction has no state for."""
    url = make_url(settings.database_url).set(drivername="postgresql")

    async def keep_session(connection: asyncpg.Connection) -> None:
        return None

    pool = await asyncpg.create_pool(
        url.render_as_string(hide_password=False),
        min_size=READERS,
        max_size=READERS,
        reset=keep_session,
    )
    try:

        async def raw_read() -> object:
            async with pool.acquire() as connection:
                return await connection.fetchrow(STATS_SQL, insight_id)

        _, p99, rate = await _measure(raw_read)
        _, paced_p99 = await _pace(raw_read, paced_per_s)
    finally:
        await pool.close()
    return p99, rate, paced_p99


async def _store_many(engine: AsyncEngine, insight_id: str, rows: int) -> None:
    """``rows`` ratings of ``insight_id``, by INSERT ... SELECT statements of
    ``INSERT_MANY`` rows (one statement of 1M rows can outlast the 30 s command
    timeout on a slow machine); the stats by the same statements' trigger."""
    for first in range(1, rows + 1, INSERT_MANY):
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO insight_feedback (insight_id, user_id, rating, comment,"
                    " created_at, updated_at, event_key)"
                    " SELECT :insight, 'user-' || n, 1 + n % 5,"
                    " CASE WHEN n % 3 = 0 THEN 'ok' END, now(), now(), '\\x00'"
                    " FROM generate_series(CAST(:first AS int), CAST(:last AS int)) AS n"
                ),
                {"insight": insight_id, "first": first, "last": min(rows, first + INSERT_MANY - 1)},
            )


# -- the scenario ----------------------------------------------------------------------


async def run() -> None:
    wrk = await _ensure_wrk()
    settings = await fresh_database("utxoiq_bench_read")
    # Redis outlives the database: a key of its own per run, removed at the end.
    insight_id = f"bench-read-{uuid.uuid4().hex[:10]}"
    key = stats_cache_key(insight_id)
    engine = create_engine(settings)
    db = _CountingDatabase(engine, None)
    cache = create_cache(settings)  # as the worker builds it: reads multiplexed
    reads = CacheService(cache, db)
    try:
        events = _events(insight_id)
        for i in range(0, ROWS, INSERT_BATCH):
            outcome = await db.apply_feedback_events(events[i : i + INSERT_BATCH])
            if outcome.failures:
                raise RuntimeError(f"feedback insert failed: {outcome.failures}")
        expected = await db.get_feedback_stats(insight_id)
        if expected.total_ratings != ROWS:
            raise RuntimeError(f"expected {ROWS} ratings, the database has {expected}")
        big_id = f"{insight_id}-1m"
        await _store_many(engine, big_id, BIG_ROWS)
        if (await db.get_feedback_stats(big_id)).total_ratings != BIG_ROWS:
            raise RuntimeError(f"expected {BIG_ROWS} ratings of {big_id}")

        # Warm the key with a guarded fill (as a first reader would), then check it holds.
        if await reads.get_feedback_stats(insight_id) != expected or await cache.get(key) is None:
            raise RuntimeError("the cache was not filled (is Redis up?)")

        async def cached() -> object:
            return await reads.get_feedback_stats(insight_id)

        async def uncached() -> object:
            return await db.get_feedback_stats(insight_id)

        queries = db.queries
        c50, c99, c_rate = await _measure(cached)
        if db.queries != queries or await cache.get(key) is None:
            raise RuntimeError(
                f"{db.queries - queries} cached reads went to the database (Redis down, "
                "paused or flushed by another process?); run again"
            )
        u50, u99, u_rate = await _measure(uncached)
        u_paced_per_s = u_rate * PACED_SHARE
        u_paced50, u_paced99 = await _pace(uncached, u_paced_per_s)

        raw_reads = cache.reads
        if raw_reads is None:
            raise RuntimeError(f"REDIS_URL {settings.redis_url} is not one reads multiplex on")

        async def raw_read() -> object:
            return await raw_reads.mget([key])

        async def redis_py_get() -> object:
            return await cache.redis.get(key)

        _, raw_p99, raw_rate = await _measure(raw_read)
        _, py_p99, py_rate = await _measure(redis_py_get)

        async def uncached_big() -> object:
            return await db.get_feedback_stats(big_id)

        _, u99_big, _ = await _measure(uncached_big)
        raw_db_p99, raw_db_rate, raw_db_paced99 = await _raw_database_read(
            settings, insight_id, u_paced_per_s
        )

        total = expected.total_ratings
        cached_http, cached_paced = await _http_phase(settings, True, insight_id, total, wrk)
        uncached_http, uncached_paced = await _http_phase(settings, False, insight_id, total, wrk)
        ceiling_http, (ceiling_paced, ceiling_uncached_paced) = await _ceiling_phase(
            settings, wrk, [cached_paced.offered_per_s, uncached_paced.offered_per_s]
        )
    finally:
        with contextlib.suppress(Exception):
            await cache.redis.delete(key, version_key(key))
        await cache.close()
        await engine.dispose()

    report(SCENARIO, "cached_in_process_p50_ms", c50)
    report(SCENARIO, "cached_in_process_p99_ms", c99, "uncached_in_process_p99", u99)
    report(SCENARIO, "cached_in_process_reads_per_s", c_rate, "raw_read_same_connection", raw_rate)
    report(SCENARIO, "raw_read_same_connection_p99_ms", raw_p99)
    report(SCENARIO, "redis_py_get_reads_per_s", py_rate, "raw_read_same_connection", raw_rate)
    report(SCENARIO, "redis_py_get_p99_ms", py_p99)
    report(SCENARIO, "uncached_in_process_p50_ms", u50)
    report(SCENARIO, "uncached_in_process_p99_ms", u99)
    report(SCENARIO, "uncached_in_process_p99_ms_1m_rows", u99_big)
    report(SCENARIO, "uncached_in_process_paced_p50_ms", u_paced50)
    report(
        SCENARIO,
        "uncached_in_process_paced_p99_ms",
        u_paced99,
        f"raw_asyncpg_read_paced_at_{u_paced_per_s:.0f}_per_s",
        raw_db_paced99,
    )
    report(SCENARIO, "uncached_in_process_reads_per_s", u_rate, "raw_asyncpg_read", raw_db_rate)
    report(SCENARIO, "raw_asyncpg_read_p99_ms", raw_db_p99)
    report(SCENARIO, "cached_http_p50_ms", cached_http.p50_ms)
    http_p99 = cached_http.p99_ms
    report(SCENARIO, "cached_http_p99_ms", http_p99, "uncached_http_p99", uncached_http.p99_ms)
    http_rate = cached_http.requests_per_s
    report(
        SCENARIO, "cached_http_req_per_s", http_rate, "empty_server", ceiling_http.requests_per_s
    )
    report(SCENARIO, "uncached_http_p50_ms", uncached_http.p50_ms)
    report(SCENARIO, "uncached_http_p99_ms", uncached_http.p99_ms)
    report(SCENARIO, "uncached_http_req_per_s", uncached_http.requests_per_s)
    paced.report_against(SCENARIO, "cached_http_paced", cached_paced, ceiling_paced)
    paced.report_against(SCENARIO, "uncached_http_paced", uncached_paced, ceiling_uncached_paced)
