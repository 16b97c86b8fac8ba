"""One Redis connection that carries every cache read of a process at once.

redis-py gives each command a pooled connection of its own and waits for its reply
before that connection serves another: per read, a pool checkout, a timeout context
and a parser round trip in Python, most of what a cached HTTP read costs (README).
Redis answers the commands of a connection in the order it got them, so the reads of
many tasks can share one socket: each command is written behind the others (the
commands of one event-loop iteration go out in one write), and each reply settles
the oldest waiter. hiredis, redis-py's own parser, reads the replies.

Only what the cache's read needs: MGET, on a plain TCP URL (``redis://``, with a
username, a password, a database). ``from_url`` gives None for any other URL (TLS, a
Unix socket, options): the cache then reads through redis-py's pool.

Failures are redis-py's exceptions, so a caller handles one kind: a refused or lost
connection is ``ConnectionError``, and a reply not in within ``timeout_s`` is
``TimeoutError`` for that read and every one behind it on the socket (the connection
is dropped: replies come in order, so a Redis that hangs one read hangs them all).
The next read connects again.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

import hiredis
from opentelemetry.trace import SpanKind, Tracer
from opentelemetry.util.types import AttributeValue
from redis.asyncio.connection import parse_url
from redis.exceptions import (
    AuthenticationError,
    ConnectionError,
    DataError,
    InvalidResponse,
    RedisError,
    ResponseError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

DEFAULT_PORT = 6379
_URL_FIELDS = frozenset({"host", "port", "db", "username", "password"})


def _command(*parts: bytes) -> bytes:
    """``parts`` in RESP, as Redis reads a command."""
    encoded = [b"*%d\r\n" % len(parts)]
    for part in parts:
        encoded.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(encoded)


class _Replies(asyncio.Protocol):
    """The socket's two directions: commands queued for the next write, and the
    waiters of the commands sent, oldest first, each with its deadline."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._parser = hiredis.Reader(protocolError=InvalidResponse, replyError=ResponseError)
        self._waiters: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._outgoing: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self.ended: RedisError | None = None
        """Why the connection ended, once it has (every later request fails with it)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not a subclass of asyncio's, hence the cast).
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._parser.feed(data)
        while True:
            try:
                reply = self._parser.gets()
            except InvalidResponse as error:
                self.end(error)
                return
            if reply is False:
                return
            if not self._waiters:
                self.end(InvalidResponse("redis sent a reply nobody asked for"))
                return
            waiter, _ = self._waiters.popleft()
            if waiter.done():
                continue  # its caller went away (cancelled); the reply is dropped
            if isinstance(reply, ResponseError):
                waiter.set_exception(reply)
            else:
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        cause = f": {exc}" if exc else " by the server"
        self.end(ConnectionError(f"connection to redis closed{cause}"))

    def request(self, command: bytes) -> asyncio.Future[Any]:
        """The future reply of ``command``, sent with this iteration's others."""
        if self.ended is not None:
            raise self.ended
        loop = asyncio.get_running_loop()
        if not self._outgoing:
            loop.call_soon(self._flush)
        self._outgoing.append(command)
        waiter = loop.create_future()
        deadline = loop.time() + self.timeout_s
        self._waiters.append((waiter, deadline))
        if self._watchdog is None:
            self._watchdog = loop.call_at(deadline, self._check_oldest)
        return waiter

    def _flush(self) -> None:
        if self._transport is not None and self.ended is None:
            self._transport.write(b"".join(self._outgoing))
        self._outgoing.clear()

    def _check_oldest(self) -> None:
        """Replies come in order: the oldest waiter is the first that can be late.
        One timer for the whole socket, not one per read."""
        self._watchdog = None
        if not self._waiters or self.ended is not None:
            return
        _, deadline = self._waiters[0]
        loop = asyncio.get_running_loop()
        if loop.time() >= deadline:
            self.end(RedisTimeoutError(f"no reply from redis within {self.timeout_s} s"))
            return
        self._watchdog = loop.call_at(deadline, self._check_oldest)

    def end(self, error: RedisError) -> None:
        """Close the socket; every waiter, and every later request, fails with ``error``."""
        if self.ended is None:
            self.ended = error
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self._waiters:
            waiter, _ = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(self.ended)
        self._outgoing.clear()
        if self._transport is not None:
            self._transport.close()


class MultiplexedRedis:
    """MGET over one shared connection to the Redis of a ``redis://`` URL, opened on
    the first read and again after a failure."""

    def __init__(
        self,
        host: str,
        port: int = DEFAULT_PORT,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        *,
        timeout_s: float,
        connect_timeout_s: float,
        tracer: Tracer | None = None,
    ) -> None:
        self.host, self.port, self.db = host, port, db
        self._credentials = (username, password)
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.tracer = tracer
        self._replies: _Replies | None = None
        self._connecting = asyncio.Lock()
        self._attempts = 0  # connection attempts finished
        self._failure: RedisError | None = None
        self._closed = False

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_s: float,
        connect_timeout_s: float,
        tracer: Tracer | None = None,
    ) -> MultiplexedRedis | None:
        """A connection for ``url`` as redis-py reads it, or None if it is not a plain
        ``redis://`` URL (the caller keeps redis-py's pool for those)."""
        fields = parse_url(url)
        if not fields.keys() <= _URL_FIELDS or "host" not in fields:
            return None
        return cls(
            fields["host"],
            fields.get("port", DEFAULT_PORT),
            fields.get("db", 0),
            fields.get("username"),
            fields.get("password"),
            timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s,
            tracer=tracer,
        )

    async def mget(self, keys: Sequence[str]) -> list[str | None]:
        """The values of ``keys`` (None where absent), in one atomic MGET."""
        command = _command(b"MGET", *(key.encode() for key in keys))
        if self.tracer is None:
            values = await self._request(command)
        else:
            # What redis-py's instrumentation records of a command.
            attributes: dict[str, AttributeValue] = {
                "db.system": "redis",
                "db.statement": "MGET" + " ?" * len(keys),
                "db.redis.database_index": self.db,
                "net.peer.name": self.host,
                "net.peer.port": self.port,
            }
            with self.tracer.start_as_current_span(
                "MGET", kind=SpanKind.CLIENT, attributes=attributes
            ):
                values = await self._request(command)
        try:
            return [None if value is None else value.decode() for value in values]
        except UnicodeDecodeError as error:
            raise DataError(f"a cached value is not UTF-8: {error}") from None

    async def _request(self, command: bytes) -> Any:
        replies = self._replies
        if replies is None or replies.ended is not None:
            replies = await self._connect()
        return await replies.request(command)

    async def _connect(self) -> _Replies:
        """The open connection, opening it if needed: concurrent readers share one
        attempt, and all see its failure (a Redis that refuses is asked once, not
        once per waiting reader)."""
        attempt = self._attempts
        async with self._connecting:
            if self._closed:
                raise ConnectionError("the multiplexed redis connection is closed")
            replies = self._replies
            if replies is not None and replies.ended is None:
                return replies
            if self._attempts != attempt and self._failure is not None:
                # The attempt this reader waited for failed: its error, raised anew.
                raise type(self._failure)(*self._failure.args)
            self._replies = None
            try:
                replies = await self._open()
            except RedisError as error:
                self._failure = error
                raise
            finally:
                self._attempts += 1  # counted once over: readers waiting saw it start
            self._failure = None
            self._replies = replies
            return replies

    async def _open(self) -> _Replies:
        loop = asyncio.get_running_loop()
        where = f"{self.host}:{self.port}"
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, replies = await loop.create_connection(
                    lambda: _Replies(self.timeout_s), self.host, self.port
                )
        except TimeoutError:
            raise RedisTimeoutError(f"connecting to redis at {where} timed out") from None
        except OSError as error:
            raise ConnectionError(f"cannot connect to redis at {where}: {error}") from None
        try:
            await self._set_up(replies)
        except BaseException:
            replies.end(ConnectionError("set-up failed"))
            raise
        return replies

    async def _set_up(self, replies: _Replies) -> None:
        """Authenticate and select the database, as redis-py does on connect."""
        username, password = self._credentials
        steps = []
        if password is not None:
            credentials = [username.encode()] if username else []
            steps.append(("AUTH", _command(b"AUTH", *credentials, password.encode())))
        if self.db:
            steps.append(("SELECT", _command(b"SELECT", str(self.db).encode())))
        waiters = [(name, replies.request(command)) for name, command in steps]
        for name, waiter in waiters:
            try:
                await waiter
            except ResponseError as error:
                if name == "AUTH":
                    raise AuthenticationError(f"redis refused the credentials: {error}") from None
                raise ConnectionError(f"redis refused {name}: {error}") from None

    async def aclose(self) -> None:
        async with self._connecting:
            self._closed = True
            if self._replies is not None:
                self._replies.end(ConnectionError("the multiplexed redis connection is closed"))
                self._replies = None
