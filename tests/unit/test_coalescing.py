"""``worker.http.coalescing.CoalescingTransport``: the writes of one loop iteration in
one write to the socket, and nothing lost or reordered on the way."""

from __future__ import annotations

import asyncio
from typing import Any

from worker.http.coalescing import MAX_HELD_BYTES, CoalescingTransport


class RecordingTransport:
    """What reached the socket, write by write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "a write after close"
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        self.paused = True


def coalescing() -> tuple[CoalescingTransport, RecordingTransport]:
    socket = RecordingTransport()
    return CoalescingTransport(socket, asyncio.get_running_loop()), socket  # type: ignore[arg-type]


async def test_a_head_and_body_written_together_leave_in_one_write() -> None:
    transport, socket = coalescing()
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    transport.write(b"{}")
    assert socket.writes == [], "held until the iteration ends"
    assert transport.get_write_buffer_size() == 40
    await asyncio.sleep(0)
    assert socket.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    assert transport.get_write_buffer_size() == 0


async def test_writes_of_separate_iterations_leave_separately_and_in_order() -> None:
    transport, socket = coalescing()
    for part in (b"one", b"two", b"three"):
        transport.write(part)
        transport.write(b"")
        await asyncio.sleep(0)
    assert socket.writes == [b"one", b"two", b"three"]


async def test_closing_writes_what_is_held_first() -> None:
    transport, socket = coalescing()
    transport.write(b"HTTP/1.1 413 \r\n\r\n")
    transport.writelines([b"a", memoryview(b"b")])
    transport.close()
    assert socket.writes == [b"HTTP/1.1 413 \r\n\r\nab"] and socket.closed
    await asyncio.sleep(0)  # the scheduled flush finds nothing more
    assert socket.writes == [b"HTTP/1.1 413 \r\n\r\nab"]


async def test_a_big_body_goes_at_once() -> None:
    transport, socket = coalescing()
    transport.write(b"head")
    transport.write(b"x" * MAX_HELD_BYTES)
    assert socket.writes == [b"head" + b"x" * MAX_HELD_BYTES]
    transport.write(b"tail")
    await asyncio.sleep(0)
    assert socket.writes[1:] == [b"tail"]


async def test_what_the_peer_closed_is_dropped_and_the_rest_is_the_socket() -> None:
    transport, socket = coalescing()
    transport.write(b"late")
    socket.closed = True  # the peer went away within the iteration
    await asyncio.sleep(0)
    assert socket.writes == []
    transport.pause_reading()
    assert socket.paused
    forwarded: Any = transport.is_closing
    assert forwarded() is True
