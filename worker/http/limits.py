"""Limits on a request's head (request line and headers) that uvicorn does not set.

httptools keeps a header value it has not finished parsing by concatenating every
piece that arrives, and uvicorn sets no limit on the head, so one client sending an
endless header can hold the event loop and hundreds of MB. ``LimitedHttpToolsProtocol``
counts the head's bytes as they arrive and answers 431 once past ``max_head_bytes`` (the
parser then holds at most that and one read's chunk, and is fed nothing more); and a
head not complete ``head_timeout_s`` after its first byte (or after the connection
opened) gets 408. Both close the connection.

The hot path pays a few attribute updates per chunk and a clock read per request: the
timeout is one timer per connection that re-arms itself, not one per request. For the
same reason ``Deadlines`` bounds the reads of request bodies with one sweeping timer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, cast

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from worker.http.coalescing import CoalescingTransport

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_HEAD_BYTES = 64 * 1024
HEAD_TIMEOUT_S = 10.0
LINGER_S = 2.0


@dataclass(frozen=True)
class HeadLimits:
    max_head_bytes: int = MAX_HEAD_BYTES
    head_timeout_s: float = HEAD_TIMEOUT_S

    def protocol(self) -> type[LimitedHttpToolsProtocol]:
        """The protocol class to give ``uvicorn.Config(http=...)``."""
        if self == HeadLimits():
            return LimitedHttpToolsProtocol
        # uvicorn builds the protocol itself, so limits other than the defaults
        # (tests) travel as class attributes of a subclass.
        return type(
            "LimitedHttpToolsProtocol",
            (LimitedHttpToolsProtocol,),
            {"limits": self},
        )


def error_response(status: int, error: str, detail: str, default_headers: Any) -> bytes:
    """A complete ``connection: close`` response with the app's JSON error body."""
    body = orjson.dumps({"error": error, "detail": detail})
    content = [STATUS_LINE[status]]
    for name, value in default_headers:
        content.extend([name, b": ", value, b"\r\n"])
    content.extend(
        [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
            b"connection: close\r\n\r\n",
            body,
        ]
    )
    return b"".join(content)


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a size limit and a read timeout on the head."""

    limits: ClassVar[HeadLimits] = HeadLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A head is open from the connection's start (its first request may not have
        # sent a byte yet) and from each request's first byte, until its headers end.
        self._head_open = True
        self._head_bytes = 0
        self._parsed_head_bytes = 0  # the parser's own pieces: exact, whatever the reads
        self._head_started = 0.0
        # While the chunk in which a head began is fed, the parser reports that head's
        # exact sizes (on_url, on_header): the chunk may also end a previous body.
        self._exact = False
        self._refused = False
        self._head_timer: Any = None

    def connection_made(self, transport: Any) -> None:
        # Each answer in one write (head and body); the socket's transport otherwise.
        coalescing = cast(asyncio.Transport, CoalescingTransport(transport, self.loop))
        super().connection_made(coalescing)
        self._head_started = self.loop.time()
        self._head_timer = self.loop.call_later(self.limits.head_timeout_s, self._check_head)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        continued = self._head_open
        super().data_received(data)
        if continued and self._head_open and not self._exact:
            # The same head was open before and after: the whole chunk belongs to it.
            # (Counted only now: a chunk that ends a head may hold the next request.)
            self._head_bytes += len(data)
        self._exact = False
        if self._head_open and self._head_bytes > self.limits.max_head_bytes:
            self._refuse_head_too_large()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_open = True
        self._head_bytes = 0
        self._parsed_head_bytes = 0  # the parser's own pieces: exact, whatever the reads
        self._exact = True
        self._head_started = self.loop.time()

    def on_url(self, url: bytes) -> None:
        self._parsed_head_bytes += len(url)
        if self._exact:
            self._head_bytes += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._parsed_head_bytes += len(name) + len(value) + 4  # ": " and CRLF
        if self._exact:
            self._head_bytes += len(name) + len(value) + 4
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_open = False
        if self._parsed_head_bytes > self.limits.max_head_bytes:
            # A head that ended within the read that took it past the limit: refused
            # before uvicorn parses its URL (httptools' URL parser fails on one over
            # 64 KiB: a 400 instead of 431).
            self._refuse_head_too_large()
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:  # the parser goes on through the rest of a refused read
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            super().on_message_complete()

    def _check_head(self) -> None:
        self._head_timer = None
        if self._refused or self.transport.is_closing():
            return
        waited_s = self.loop.time() - self._head_started
        if self._head_open and waited_s >= self.limits.head_timeout_s:
            log.info(
                "request head not received in time",
                extra={"client": self.client, "head_bytes": self._head_bytes},
            )
            self._refuse(
                408,
                "request_timeout",
                f"headers not received within {self.limits.head_timeout_s:g} s",
            )
            return
        delay_s = self.limits.head_timeout_s
        if self._head_open:
            delay_s -= waited_s
        self._head_timer = self.loop.call_later(delay_s, self._check_head)

    def _refuse_head_too_large(self) -> None:
        log.info(
            "request head too large",
            extra={"client": self.client, "head_bytes": self._head_bytes},
        )
        self._refuse(
            431,
            "headers_too_large",
            f"request line and headers over {self.limits.max_head_bytes} bytes",
        )

    def _refuse(self, status: int, error: str, detail: str) -> None:
        self._refused = True  # from now on, what arrives is dropped unread
        # A pipelined request may still be answering on this connection: an error
        # response now would land inside its response, so the connection just closes.
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()
            return
        self.transport.write(
            error_response(status, error, detail, self.server_state.default_headers)
        )
        # Closing with the client's bytes unread would send a reset, and a client still
        # sending its head loses the response with it: end our side, drop what still
        # arrives, and close once the client has closed or after a moment.
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


class Deadlines:
    """Bounds awaits to ``timeout_s`` with one sweeping timer for all of them.

    A timer per request (``asyncio.timeout``) costs several microseconds under uvloop;
    this costs two dict operations, and a timeout fires up to ``timeout_s / 4`` (at
    most 1 s) late.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._pending: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    async def run(self, awaitable: Awaitable[T]) -> T:
        """``awaitable``'s result; ``TimeoutError`` once it has taken ``timeout_s``."""
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - always awaited in a task
            return await awaitable
        loop = task.get_loop()
        self._pending[task] = loop.time() + self.timeout_s
        if self._timer is None or self._timer_loop is not loop:
            self._arm(loop)
        try:
            return await awaitable
        except asyncio.CancelledError:
            # Ours only if nobody else cancelled the task as well.
            if task in self._expired and task.uncancel() == 0:
                raise TimeoutError from None
            raise
        finally:
            del self._pending[task]
            if self._expired:
                self._expired.discard(task)

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer_loop = loop
        period_s = min(1.0, self.timeout_s / 4)
        self._timer = loop.call_later(period_s, self._sweep, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        for task, deadline in self._pending.items():
            if deadline <= now and task not in self._expired:
                self._expired.add(task)
                task.cancel()
        if self._pending:
            self._arm(loop)
