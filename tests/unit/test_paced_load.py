"""``bench.paced``: requests go out on schedule whatever the answers, and a stalled
server is charged for every request due during the stall (no coordinated omission)."""

from __future__ import annotations

import asyncio
import contextlib

from bench import paced

STALL_S = 0.2


async def _server(stall_on: int) -> tuple[asyncio.Server, list[float]]:
    """Answers each request 204 at once, except request ``stall_on``: after STALL_S."""
    arrivals: list[float] = []
    loop = asyncio.get_running_loop()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with contextlib.suppress(asyncio.IncompleteReadError):  # the client closed
                while await reader.readuntil(b"\r\n\r\n"):
                    arrivals.append(loop.time())
                    if len(arrivals) == stall_on:
                        await asyncio.sleep(STALL_S)
                    writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                    await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, arrivals


async def test_a_stall_is_charged_to_every_request_due_during_it() -> None:
    server, arrivals = await _server(stall_on=50)
    port = server.sockets[0].getsockname()[1]
    rate, count = 500.0, 300  # one request every 2 ms, for 0.6 s
    async with server:
        load = await paced.offer("127.0.0.1", port, [paced.get("/")] * count, rate, 1)
    assert (load.sent, load.ok, load.failed) == (count, count, 0)
    # One connection: the ~100 requests due during the stall waited for it, each charged
    # from its due time. A closed-loop client would report one slow request, not 100.
    assert load.max_ms >= STALL_S * 1000 * 0.9
    assert load.p50_ms < 50 < STALL_S * 1000 * 0.4 < load.p99_ms, load
    # Sent on schedule otherwise: the whole offer took about count / rate, plus the stall.
    assert arrivals[-1] - arrivals[0] < count / rate + STALL_S + 0.2


async def test_requests_go_out_at_the_rate_asked() -> None:
    server, arrivals = await _server(stall_on=0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        load = await paced.offer("127.0.0.1", port, [paced.get("/")] * 200, 400.0, 4)
    assert load.ok == 200 and load.p99_ms < 50
    # A request sent a little before its due time counts from its send: never negative.
    assert min(latency_ms for _, latency_ms in load.timeline) > 0
    spread_s = arrivals[-1] - arrivals[0]
    assert 199 / 400 * 0.9 < spread_s < 199 / 400 + 0.1, spread_s


async def test_in_process_a_stalled_call_is_charged_to_every_call_due_during_it() -> None:
    started: list[float] = []
    loop = asyncio.get_running_loop()

    async def call() -> None:
        started.append(loop.time())
        if len(started) == 50:
            await asyncio.sleep(STALL_S)

    rate, count = 500.0, 300
    load = await paced.offer_calls(call, count, rate, 1)
    assert (load.sent, load.ok, load.failed) == (count, count, 0)
    # One task: the ~100 calls due during the stall waited for it, each from its due time.
    assert load.max_ms >= STALL_S * 1000 * 0.9
    assert load.p50_ms < 50 < STALL_S * 1000 * 0.4 < load.p99_ms, load
    assert started[-1] - started[0] < count / rate + STALL_S + 0.2


async def test_in_process_calls_go_out_at_the_rate_asked_and_overlap() -> None:
    started: list[float] = []
    in_flight, most = 0, 0
    loop = asyncio.get_running_loop()

    async def call() -> None:
        nonlocal in_flight, most
        started.append(loop.time())
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.01)  # longer than the interval: needs several tasks
        in_flight -= 1

    load = await paced.offer_calls(call, 200, 400.0, 8)
    assert load.ok == 200 and load.p99_ms < 50, load
    assert min(latency_ms for _, latency_ms in load.timeline) > 0
    assert 2 <= most <= 8
    spread_s = started[-1] - started[0]
    assert 199 / 400 * 0.9 < spread_s < 199 / 400 + 0.1, spread_s
