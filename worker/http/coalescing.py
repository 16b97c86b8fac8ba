"""A response in one write: the head and the body of an answer leave together.

uvicorn writes a response's status line and headers, then its body, as two
``transport.write`` calls; on an idle socket each is a ``send`` system call and a TCP
segment of its own. ``CoalescingTransport`` stands between uvicorn's protocol and the
socket: what is written during one event-loop iteration is joined and written once,
at the end of that iteration (a response sent without waiting in between, as every
answer of this app is, goes out in one system call). Past ``MAX_HELD_BYTES`` what is
held goes at once: a big body is the socket's to buffer, where uvicorn's flow control
sees it. Closing writes what is held first; everything else is the socket's own
transport.
"""

from __future__ import annotations

import asyncio
from typing import Any

MAX_HELD_BYTES = 64 * 1024


class CoalescingTransport:
    """``transport``, with the writes of one loop iteration joined into one."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []
        self._held_bytes = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._held:
            self._loop.call_soon(self._flush)
        self._held.append(bytes(data))
        self._held_bytes += len(data)
        if self._held_bytes >= MAX_HELD_BYTES:
            self._flush()  # the callback above then finds nothing held

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def _flush(self) -> None:
        if not self._held:
            return
        held = self._held[0] if len(self._held) == 1 else b"".join(self._held)
        self._held.clear()
        self._held_bytes = 0
        if not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._held_bytes

    def __getattr__(self, name: str) -> Any:
        # The rest (is_closing, pause_reading, get_extra_info, abort, ...) is the socket's.
        return getattr(self._transport, name)
