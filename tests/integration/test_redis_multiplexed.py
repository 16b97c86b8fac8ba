"""``worker.storage.redis_multiplexed.MultiplexedRedis``: many reads on one Redis socket.

On the real Redis: every concurrent read gets its own keys' values, on one
connection; the URL's database and credentials; a cancelled read; a connection the
server drops. Where Redis cannot be made to misbehave on cue (a server that never
answers, closes mid-read, answers an error or a reply nobody asked for), a small RESP
server of the test's own plays it, on a real socket.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import hiredis
import pytest
import pytest_asyncio
from redis import asyncio as aioredis
from redis.exceptions import (
    AuthenticationError,
    DataError,
    InvalidResponse,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tests.support.cache import REDIS_HOST, REDIS_PORT, RedisDb, own_redis_db
from worker.config import Settings
from worker.storage.redis_multiplexed import MultiplexedRedis

TIMEOUT_S = 0.3


def connect(url: str) -> MultiplexedRedis:
    reads = MultiplexedRedis.from_url(url, timeout_s=TIMEOUT_S, connect_timeout_s=TIMEOUT_S)
    assert reads is not None
    return reads


@pytest_asyncio.fixture(loop_scope="session")
async def rdb(settings: Settings) -> AsyncIterator[RedisDb]:
    async with own_redis_db(settings) as claimed:
        yield claimed


async def mget_connections(rdb: RedisDb) -> list[dict[str, str]]:
    """The server's clients on the test's database whose last command was MGET."""
    clients = await rdb.redis.client_list()
    return [c for c in clients if c["db"] == str(rdb.number) and c["cmd"] == "mget"]


# -- the real Redis ------------------------------------------------------------------------


async def test_concurrent_reads_each_get_their_own_values_on_one_connection(
    rdb: RedisDb,
) -> None:
    values = {f"key-{n}": f"value-{n}-{'é' * (n % 7)}" for n in range(400)}
    await rdb.redis.mset(values)
    reads = connect(rdb.url)
    try:

        async def read(n: int) -> tuple[int, list[str | None]]:
            await asyncio.sleep(0 if n % 2 else 0.001)  # some in the same write, some not
            return n, await reads.mget([f"key-{n}", f"absent-{n}", f"key-{(n + 1) % 400}"])

        answers = await asyncio.gather(*(read(n) for n in range(400)))
        for n, answer in answers:
            assert answer == [values[f"key-{n}"], None, values[f"key-{(n + 1) % 400}"]]
        assert len(await mget_connections(rdb)) == 1
    finally:
        await reads.aclose()


async def test_the_database_and_credentials_of_the_url(rdb: RedisDb) -> None:
    user, password = f"utxoiq-test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    await rdb.redis.set("only-here", "in the test's database")
    await rdb.redis.acl_setuser(
        user, enabled=True, passwords=[f"+{password}"], keys=["*"], categories=["+@all"]
    )
    base = f"redis://{user}:{{}}@{REDIS_HOST}:{REDIS_PORT}/{rdb.number}"
    good, bad = connect(base.format(password)), connect(base.format("wrong"))
    try:
        assert await good.mget(["only-here"]) == ["in the test's database"]
        clients = await rdb.redis.client_list()
        assert any(c["user"] == user and c["db"] == str(rdb.number) for c in clients)
        with pytest.raises(AuthenticationError):
            await bad.mget(["only-here"])
    finally:
        await good.aclose()
        await bad.aclose()
        await rdb.redis.acl_deluser(user)


async def test_a_cancelled_read_leaves_every_other_reply_in_its_place(rdb: RedisDb) -> None:
    await rdb.redis.mset({"a": "1", "b": "2"})
    reads = connect(rdb.url)
    try:
        assert await reads.mget(["a"]) == ["1"]  # connected
        cancelled = asyncio.create_task(reads.mget(["a"]))
        await asyncio.sleep(0)  # its command is queued
        cancelled.cancel()
        following = await reads.mget(["b"])
        assert following == ["2"], "the cancelled read's reply went to the next read"
        assert cancelled.cancelled()
    finally:
        await reads.aclose()


async def test_a_connection_the_server_dropped_is_opened_again(rdb: RedisDb) -> None:
    await rdb.redis.set("a", "1")
    reads = connect(rdb.url)
    try:
        assert await reads.mget(["a"]) == ["1"]
        [client] = await mget_connections(rdb)
        assert await rdb.redis.client_kill_filter(_id=client["id"]) == 1
        # The read after the kill either found the socket closed (and reconnected) or
        # raced the close notice: a ConnectionError, never a wrong or missing value.
        deadline = time.monotonic() + 5
        while True:
            try:
                assert await reads.mget(["a"]) == ["1"]
                break
            except RedisConnectionError:
                assert time.monotonic() < deadline
        [again] = await mget_connections(rdb)
        assert again["id"] != client["id"]
    finally:
        await reads.aclose()


async def test_a_value_that_is_not_utf8_is_a_data_error(rdb: RedisDb) -> None:
    raw = aioredis.Redis.from_url(rdb.url)  # bytes in, bytes out
    await raw.set("binary", b"\xff\xfe")
    await raw.set("text", "ok")
    await raw.aclose()
    reads = connect(rdb.url)
    try:
        with pytest.raises(DataError, match="not UTF-8"):
            await reads.mget(["binary"])
        assert await reads.mget(["text"]) == ["ok"], "one bad value does not end the socket"
    finally:
        await reads.aclose()


async def test_a_refused_connection_fails_at_once_and_a_closed_one_for_good(
    rdb: RedisDb,
) -> None:
    refused = connect("redis://127.0.0.1:1/0")
    started = time.monotonic()
    with pytest.raises(RedisConnectionError, match="cannot connect"):
        await refused.mget(["a"])
    assert time.monotonic() - started < TIMEOUT_S
    await refused.aclose()

    reads = connect(rdb.url)
    assert await reads.mget(["a"]) == [None]
    await reads.aclose()
    with pytest.raises(RedisConnectionError, match="closed"):
        await reads.mget(["a"])


def test_only_plain_tcp_urls_are_taken() -> None:
    def taken(url: str) -> tuple[str, int, int] | None:
        reads = MultiplexedRedis.from_url(url, timeout_s=1, connect_timeout_s=1)
        return None if reads is None else (reads.host, reads.port, reads.db)

    assert taken("redis://10.0.0.3:6380/4") == ("10.0.0.3", 6380, 4)
    assert taken("redis://:secret@cache") == ("cache", 6379, 0)
    assert taken("redis://user:p%40ss@cache/2") == ("cache", 6379, 2)
    # TLS, a Unix socket, connection options: redis-py's pool serves those.
    assert taken("rediss://cache:6379/0") is None
    assert taken("unix:///run/redis.sock?db=1") is None
    assert taken("redis://cache/0?health_check_interval=5") is None


# -- a RESP server of the test's own -------------------------------------------------------

Answer = Callable[[list[bytes]], Awaitable[bytes | None]]
"""What the server sends for a command (None: nothing, ever; ``HangUp``: it closes)."""


class HangUp(Exception):
    """Raised by an ``Answer``: the server closes the connection instead of answering."""


@asynccontextmanager
async def resp_server(answer: Answer) -> AsyncIterator[tuple[str, list[int]]]:
    """A server on a free port answering each command by ``answer``; yields its URL
    and the list of connections it accepted (their numbers, as they come)."""
    accepted: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(len(accepted))
        parser = hiredis.Reader()
        try:
            while data := await reader.read(65536):
                parser.feed(data)
                while (command := parser.gets()) is not False:
                    reply = await answer(command)
                    if reply is not None:
                        writer.write(reply)
        except (HangUp, OSError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"redis://127.0.0.1:{port}/0", accepted
    finally:
        server.close()


def bulk_array(*values: bytes) -> bytes:
    return b"*%d\r\n" % len(values) + b"".join(b"$%d\r\n%s\r\n" % (len(v), v) for v in values)


async def test_a_silent_server_times_out_every_waiting_read_then_the_next_connects_again() -> None:
    silent = True

    async def answer(command: list[bytes]) -> bytes | None:
        return None if silent else bulk_array(*(b"v-" + key for key in command[1:]))

    async with resp_server(answer) as (url, accepted):
        reads = connect(url)
        try:
            started = time.monotonic()
            waiting = [reads.mget([f"k{n}"]) for n in range(5)]
            results = await asyncio.gather(*waiting, return_exceptions=True)
            assert all(isinstance(r, RedisTimeoutError) for r in results), results
            assert TIMEOUT_S * 0.9 <= time.monotonic() - started < TIMEOUT_S * 3
            silent = False
            assert await reads.mget(["k"]) == ["v-k"]
            assert len(accepted) == 2, "the hung socket was dropped, a new one opened"
        finally:
            await reads.aclose()


async def test_a_close_mid_read_fails_the_reads_in_flight_and_the_next_connects_again() -> None:
    async def answer(command: list[bytes]) -> bytes | None:
        if command[1] == b"close":
            raise HangUp
        return bulk_array(b"fine")

    async with resp_server(answer) as (url, accepted):
        reads = connect(url)
        try:
            behind = [reads.mget(["close"]), reads.mget(["other"])]
            results = await asyncio.gather(*behind, return_exceptions=True)
            assert all(isinstance(r, RedisConnectionError) for r in results), results
            assert await reads.mget(["other"]) == ["fine"]
            assert len(accepted) == 2
        finally:
            await reads.aclose()


async def test_an_error_reply_fails_its_own_read_only() -> None:
    async def answer(command: list[bytes]) -> bytes | None:
        if command[1] == b"bad":
            return b"-WRONGTYPE not this one\r\n"
        return bulk_array(b"good")

    async with resp_server(answer) as (url, accepted):
        reads = connect(url)
        try:
            results = await asyncio.gather(
                reads.mget(["bad"]), reads.mget(["ok"]), return_exceptions=True
            )
            assert isinstance(results[0], ResponseError) and "WRONGTYPE" in str(results[0])
            assert results[1] == ["good"]
            assert len(accepted) == 1
        finally:
            await reads.aclose()


async def test_a_reply_nobody_asked_for_ends_the_connection() -> None:
    async def answer(command: list[bytes]) -> bytes | None:
        return bulk_array(b"one") + bulk_array(b"unasked")

    async with resp_server(answer) as (url, accepted):
        reads = connect(url)
        try:
            assert await reads.mget(["k"]) == ["one"]
            # The extra reply ended the socket (nothing can be trusted on it): the next
            # read either connects again or sees that end, never the stray reply.
            try:
                answer_again = await reads.mget(["k"])
            except InvalidResponse:
                answer_again = await reads.mget(["k"])
            assert answer_again == ["one"]
            assert len(accepted) == 2
        finally:
            await reads.aclose()


async def test_readers_waiting_on_a_failed_connect_share_its_failure() -> None:
    async def answer(command: list[bytes]) -> bytes | None:
        return b"-WRONGPASS invalid username-password pair\r\n"

    async with resp_server(answer) as (url, accepted):
        reads = connect(url.replace("redis://", "redis://:secret@"))
        try:
            results = await asyncio.gather(
                *(reads.mget(["k"]) for _ in range(20)), return_exceptions=True
            )
            assert all(isinstance(r, AuthenticationError) for r in results), results
            assert len(accepted) == 1, "one attempt for every reader waiting on it"
            with pytest.raises(AuthenticationError):
                await reads.mget(["k"])  # a later read tries again
            assert len(accepted) == 2
        finally:
            await reads.aclose()
