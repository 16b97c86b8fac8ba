"""A loopback TCP proxy that can stall the network: bytes stop, connections stay open.

The worker runs as a subprocess whose ``DATABASE_URL`` points at ``proxy.port``; the
proxy forwards to PostgreSQL. ``pause()`` stops forwarding in both directions (no
byte is read from either side, so nothing is lost: it waits in the kernel's buffers
and in the proxy) without closing anything, which is what a stalled network looks
like to both peers: no error, no FIN, only silence. ``resume()`` lets it all flow.
An ``observer`` (``tests/faults/push_front.py``) may watch every byte forwarded.

The proxy runs its own event loop in a thread of its own, so it keeps forwarding
whatever the test's loop is doing, and every method may be called from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Protocol

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024


class Observer(Protocol):
    """Told every chunk forwarded (``upstream``: towards the target) and every
    connection's end, from the proxy's thread."""

    def data(self, connection: int, upstream: bool, chunk: bytes) -> None: ...

    def closed(self, connection: int) -> None: ...


class TcpProxy:
    """``TcpProxy(target_port).start()``; then ``port``, ``pause()``, ``resume()``."""

    def __init__(
        self,
        target_port: int,
        target_host: str = "127.0.0.1",
        listen_host: str = "127.0.0.1",
        observer: Observer | None = None,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self.port = 0
        self.connections_accepted = 0
        self.bytes_forwarded = 0
        self.observer = observer
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    # -- control (any thread) ---------------------------------------------------------

    def start(self, timeout_s: float = 10) -> TcpProxy:
        """Listen on a free port (``self.port``) and forward from now on."""
        self._thread = threading.Thread(target=self._serve, name="tcp-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError("the proxy did not start")
        if self._startup_error is not None:
            raise RuntimeError("the proxy did not start") from self._startup_error
        return self

    def pause(self) -> None:
        """Stop forwarding bytes, both ways, on every connection (new ones included)."""
        self._call(lambda flowing: flowing.clear())

    def resume(self) -> None:
        """Forward again; what waited is delivered first, in order."""
        self._call(lambda flowing: flowing.set())

    @property
    def paused(self) -> bool:
        return self._flowing is not None and not self._flowing.is_set()

    def drop_connections(self) -> None:
        """Close every proxied connection at once (both sides see the socket close)."""
        loop = self._require_loop()
        loop.call_soon_threadsafe(self._close_all)

    def close(self, timeout_s: float = 10) -> None:
        """Stop listening, close every connection, end the thread."""
        loop = self._loop
        if loop is None or self._thread is None:
            return
        if loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            with contextlib.suppress(Exception):
                future.result(timeout_s)
            loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout_s)

    def __enter__(self) -> TcpProxy:
        return self.start() if self._thread is None else self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the proxy is not started")
        return self._loop

    def _call(self, action: Callable[[asyncio.Event], None]) -> None:
        loop = self._require_loop()
        flowing = self._flowing
        assert flowing is not None
        done = threading.Event()

        def run() -> None:
            action(flowing)
            done.set()

        loop.call_soon_threadsafe(run)
        # Once this returns, the new state holds for every byte not yet forwarded.
        done.wait(5)

    # -- the proxy's own loop ------------------------------------------------------

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._listen())
        except BaseException as error:
            self._startup_error = error
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _listen(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._handle, self.listen_host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        self.connections_accepted += 1
        connection = self.connections_accepted
        self._writers.add(client_writer)
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            # A connection made while paused is accepted (the kernel would anyway) but
            # not connected upstream: its startup waits in silence like any other byte.
            assert self._flowing is not None
            await self._flowing.wait()
            upstream_reader, upstream_writer = await asyncio.open_connection(
                self.target_host, self.target_port
            )
            self._writers.add(upstream_writer)
            await asyncio.gather(
                self._pump(client_reader, upstream_writer, connection, upstream=True),
                self._pump(upstream_reader, client_writer, connection, upstream=False),
            )
        except OSError as error:
            log.debug("proxied connection ended", extra={"error": str(error)})
        except asyncio.CancelledError:
            # Only ``close()`` cancels: asyncio's stream callback would report a
            # cancelled handler as an error, so end quietly instead.
            pass
        finally:
            if self.observer is not None:
                self.observer.closed(connection)
            for writer in (client_writer, upstream_writer):
                if writer is not None:
                    self._writers.discard(writer)
                    writer.close()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        connection: int,
        *,
        upstream: bool,
    ) -> None:
        assert self._flowing is not None
        try:
            while True:
                await self._flowing.wait()
                data = await reader.read(CHUNK_BYTES)
                if not data:
                    break
                # Paused while this read was in flight: hold the bytes until resumed.
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
                self.bytes_forwarded += len(data)
                if self.observer is not None:
                    self.observer.data(connection, upstream, data)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            # One side is done: so is the other (a FIN or reset passes through).
            writer.close()

    def _close_all(self) -> None:
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        self._close_all()
        if self._flowing is not None:
            self._flowing.set()  # let parked pumps see their closed sockets and end
        await asyncio.sleep(0)
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
