"""A constant-rate load generator, in the manner of wrk2 (not packaged here): over
HTTP/1.1 (``offer``), or of an async call in the same process (``offer_calls``).

Saturation figures (wrk: as fast as the server answers) measure the queue in front of
the server as much as the server. This offers a fixed rate instead: request ``i`` is
due at ``start + i / rate`` whatever the answers before it (open loop), and its
latency counts from when it was due, not from when it could be written. A server that
stalls for 100 ms is charged for every request due meanwhile, as users would feel it
(no coordinated omission).

Requests go over a pool of keep-alive connections, each carrying one request at a
time (the idle one that waited longest, so that none outlives the server's keep-alive
timeout unused; one the server closes is replaced); a request due while every
connection is busy waits for one, and that wait is part of its latency. Responses
are read by Content-Length (what uvicorn sends); a chunked response is an error here.
The client is asyncio protocols over prepared bytes: a few tens of microseconds of
CPU per request, on the cores it measures. Times are ``time.perf_counter``: uvloop's
``loop.time()`` is libuv's, in whole milliseconds and cached per loop iteration.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import cast

from bench.common import report

HEADER_END = b"\r\n\r\n"


@dataclass(frozen=True)
class PacedLoad:
    offered_per_s: float
    sent: int
    ok: int
    failed: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    timeline: tuple[tuple[float, float], ...] = ()
    """(seconds from the start to the request's due time, its latency in ms), in the
    order answered: where in the run the slow ones were."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one request in flight, its due time remembered."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.due = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but act as one.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, request: bytes, due: float) -> None:
        assert self.transport is not None
        self.due = due
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(HEADER_END)
        if end < 0:
            return
        head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                raise RuntimeError(f"paced client: {line!r} is not supported")
        if len(self.buffer) < end + len(HEADER_END) + length:
            return
        del self.buffer[: end + len(HEADER_END) + length]
        status = int(head[0].split(" ", 2)[1])
        self.pool.answered(self, 200 <= status < 300)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.lost(self)


class _Pool:
    """The connections: idle ones taken oldest first, so that none idles long enough
    for the server's keep-alive timeout; one the server closed is replaced."""

    def __init__(self, host: str, port: int, expected: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.host, self.port = host, port
        self.idle: deque[_Connection] = deque()
        self.busy: set[_Connection] = set()
        self.freed = asyncio.Event()
        self.latencies_s: list[float] = []
        self.answered_due: list[float] = []
        self.failed = 0
        self.expected = expected
        self.done = asyncio.Event()
        self.reconnects: set[asyncio.Task[None]] = set()

    async def connect(self) -> None:
        _, protocol = await self.loop.create_connection(
            lambda: _Connection(self), self.host, self.port
        )
        self.idle.append(protocol)
        self.freed.set()

    def answered(self, connection: _Connection, ok: bool) -> None:
        if ok:
            self.latencies_s.append(time.perf_counter() - connection.due)
            self.answered_due.append(connection.due)
        else:
            self.failed += 1
        self.busy.discard(connection)
        self.idle.append(connection)
        self.freed.set()
        self._maybe_done()

    def lost(self, connection: _Connection) -> None:
        if connection in self.busy:  # its request will never be answered
            self.busy.discard(connection)
            self.failed += 1
            self._maybe_done()
        elif connection in self.idle:
            self.idle.remove(connection)
        if not self.done.is_set():
            task = self.loop.create_task(self.connect())
            self.reconnects.add(task)
            task.add_done_callback(self.reconnects.discard)

    def _maybe_done(self) -> None:
        if len(self.latencies_s) + self.failed >= self.expected:
            self.done.set()

    async def take(self) -> _Connection:
        while True:
            while not self.idle:
                if not self.busy and not self.reconnects:
                    raise RuntimeError("paced client: every connection was closed")
                self.freed.clear()
                await self.freed.wait()
            connection = self.idle.popleft()
            # Closed by the server, its connection_lost not yet run: it goes then.
            if connection.transport is not None and not connection.transport.is_closing():
                self.busy.add(connection)
                return connection


async def offer(
    host: str, port: int, requests: Sequence[bytes], rate_per_s: float, connections: int
) -> PacedLoad:
    """Send ``requests`` (complete HTTP/1.1 requests) at ``rate_per_s``; their latencies."""
    pool = _Pool(host, port, len(requests))
    for _ in range(connections):
        await pool.connect()
    gc.collect()
    gc.disable()  # a collection would stall sends and charge the server for it
    try:
        start = time.perf_counter() + 0.05
        interval_s = 1 / rate_per_s
        for i, request in enumerate(requests):
            due = start + i * interval_s
            ahead_s = due - time.perf_counter()
            if ahead_s > 0.001:  # the loop's timers are not finer; sooner ones go now
                await asyncio.sleep(ahead_s)
            connection = await pool.take()
            # Sent up to a timer tick early: then its latency counts from the send.
            connection.send(request, min(due, time.perf_counter()))
        await asyncio.wait_for(pool.done.wait(), 30)
    finally:
        gc.enable()
        pool.done.set()  # no reconnect from here on
        for task in list(pool.reconnects):
            task.cancel()
        for connection in [*pool.idle, *pool.busy]:
            if connection.transport is not None:
                connection.transport.close()
    return _load(rate_per_s, len(requests), pool.failed, start, pool.latencies_s, pool.answered_due)


async def offer_calls(
    call: Callable[[], Awaitable[object]], count: int, rate_per_s: float, concurrency: int
) -> PacedLoad:
    """``count`` calls of ``call`` at ``rate_per_s`` by ``concurrency`` tasks, open loop as
    ``offer``: call ``i`` is due at ``start + i / rate_per_s``, and a call due while every
    task is busy waits for one, charged from its due time. For a read measured in the
    process that serves it (its client shares that process's loop and core)."""
    latencies_s: list[float] = []
    answered_due: list[float] = []
    next_calls = iter(range(count))
    start = time.perf_counter() + 0.05
    interval_s = 1 / rate_per_s

    async def caller() -> None:
        for i in next_calls:  # shared by the tasks: each takes the next call due
            due = start + i * interval_s
            ahead_s = due - time.perf_counter()
            if ahead_s > 0.001:  # the loop's timers are not finer; sooner ones go now
                await asyncio.sleep(ahead_s)
            due = min(due, time.perf_counter())  # called up to a tick early: from then
            await call()
            latencies_s.append(time.perf_counter() - due)
            answered_due.append(due)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return _load(rate_per_s, count, 0, start, latencies_s, answered_due)


def _load(
    rate_per_s: float,
    sent: int,
    failed: int,
    start: float,
    latencies_s: list[float],
    answered_due: list[float],
) -> PacedLoad:
    latencies_ms = sorted(s * 1000 for s in latencies_s)
    cuts = statistics.quantiles(latencies_ms, n=100) if len(latencies_ms) > 1 else [0.0] * 99
    return PacedLoad(
        offered_per_s=rate_per_s,
        sent=sent,
        ok=len(latencies_ms),
        failed=failed,
        p50_ms=cuts[49],
        p99_ms=cuts[98],
        max_ms=latencies_ms[-1] if latencies_ms else 0.0,
        timeline=tuple(
            (due - start, latency * 1000)
            for due, latency in zip(answered_due, latencies_s, strict=True)
        ),
    )


def report_against(scenario: str, prefix: str, load: PacedLoad, baseline: PacedLoad) -> None:
    """``{prefix}_p50_ms``, ``_p99_ms`` and ``_max_ms`` of ``load``, each against the same
    figure of ``baseline`` (the do-nothing server offered the same rate)."""
    rate = f"empty_server_paced_at_{load.offered_per_s:.0f}_req_per_s"
    for name in ("p50_ms", "p99_ms", "max_ms"):
        report(scenario, f"{prefix}_{name}", getattr(load, name), rate, getattr(baseline, name))


def post(path: str, body: bytes, host: str = "127.0.0.1") -> bytes:
    """An HTTP/1.1 POST of a JSON ``body``, as bytes to send."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


def get(path: str, host: str = "127.0.0.1") -> bytes:
    """An HTTP/1.1 GET, as bytes to send."""
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode("ascii")
