"""What went through the push front: every push request and its answer, by message id.

``PushRecorder`` watches the bytes a ``TcpProxy`` forwards (its ``observer``) and
parses them as the HTTP/1.1 the emulator speaks (one request at a time per
connection, bodies with Content-Length). It tells the scenario two things:

- progress: when the emulator last pushed, and when ``serve`` last answered 204, so
  a verdict can wait as long as the emulator is still working through its backlog
  (it pushes one request at a time per subscription, so a backlog can take minutes)
  and stop waiting when it stalled;
- what became of a message the database lacks: ``serve`` answered 204 (ours: acked
  but not committed), the emulator never pushed it, or its last push failed (no
  2xx, no answer) and the emulator never pushed it again (the emulator's known
  bug: after pushes that fail for about a second it stops pushing the message).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

NO_ANSWER = 0
"""The status of a push that got no answer (the connection ended first)."""


@dataclass
class PushHistory:
    """The pushes of one message id, in order: ``(time, status)`` once answered."""

    topic: str
    answers: list[tuple[float, int]] = field(default_factory=list)
    pushed_at: list[float] = field(default_factory=list)

    @property
    def acked(self) -> bool:
        return any(status == 204 for _, status in self.answers)


@dataclass
class _Connection:
    request: bytes = b""
    response: bytes = b""
    waiting: list[str | None] = field(default_factory=list)
    """Message ids of requests not answered yet, in order."""


def _messages(buffer: bytes) -> tuple[list[tuple[str, bytes]], bytes]:
    """Complete HTTP messages in ``buffer`` as (start line, body); the rest."""
    found = []
    while (end := buffer.find(b"\r\n\r\n")) >= 0:
        head = buffer[:end].decode("latin-1").split("\r\n")
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip() or 0)
        if len(buffer) < end + 4 + length:
            break
        found.append((head[0], buffer[end + 4 : end + 4 + length]))
        buffer = buffer[end + 4 + length :]
    return found, buffer


class PushRecorder:
    """A ``TcpProxy`` observer (called from the proxy's thread; read from any)."""

    def __init__(self) -> None:
        self.pushes: dict[str, PushHistory] = {}
        self.requests = 0
        self.last_push_at = 0.0
        self.last_ack_at = 0.0
        self._connections: dict[int, _Connection] = {}
        self._lock = threading.Lock()

    # -- the proxy's side -------------------------------------------------------------

    def data(self, connection: int, upstream: bool, chunk: bytes) -> None:
        """Bytes forwarded on ``connection``: to ``serve`` (upstream) or back."""
        with self._lock:
            state = self._connections.setdefault(connection, _Connection())
            now = time.monotonic()
            if upstream:
                requests, state.request = _messages(state.request + chunk)
                for line, body in requests:
                    state.waiting.append(self._pushed(line, body, now))
            else:
                responses, state.response = _messages(state.response + chunk)
                for line, _ in responses:
                    parts = line.split(" ")
                    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1
                    if state.waiting:
                        self._answered(state.waiting.pop(0), status, now)

    def closed(self, connection: int) -> None:
        with self._lock:
            state = self._connections.pop(connection, None)
            for message_id in state.waiting if state else ():
                self._answered(message_id, NO_ANSWER, time.monotonic())

    def _pushed(self, line: str, body: bytes, now: float) -> str | None:
        self.requests += 1
        self.last_push_at = now
        try:
            envelope = json.loads(body)
            message_id = str(envelope["message"]["messageId"])
        except (ValueError, KeyError, TypeError):
            return None
        path = line.split(" ")[1] if " " in line else ""
        history = self.pushes.setdefault(message_id, PushHistory(path.rsplit("/", 1)[-1]))
        history.pushed_at.append(now)
        return message_id

    def _answered(self, message_id: str | None, status: int, now: float) -> None:
        if status == 204:
            self.last_ack_at = now
        if message_id is not None and message_id in self.pushes:
            self.pushes[message_id].answers.append((now, status))

    # -- the verdict's side -----------------------------------------------------------

    def quiet_for(self) -> float:
        """Seconds since the emulator last pushed anything."""
        return time.monotonic() - self.last_push_at if self.last_push_at else float("inf")

    def stalled_for(self) -> float:
        """Seconds since ``serve`` last answered a push with 204."""
        return time.monotonic() - self.last_ack_at if self.last_ack_at else float("inf")

    def acked(self, message_ids: list[str]) -> bool:
        with self._lock:
            return any(self.pushes[m].acked for m in message_ids if m in self.pushes)

    def fate(self, message_ids: list[str], *, given_up_s: float) -> str:
        """Of a message published under ``message_ids``: ``acked`` (204), ``never
        pushed``, ``pushing`` (still being retried), or ``dropped by the emulator`` (its
        last push failed ``given_up_s`` ago or more and none came since)."""
        with self._lock:
            histories = [self.pushes[m] for m in message_ids if m in self.pushes]
            if not histories:
                return "never pushed"
            if any(h.acked for h in histories):
                return "acked"
            last = max(h.pushed_at[-1] for h in histories)
        if time.monotonic() - last >= given_up_s:
            return "dropped by the emulator"
        return "pushing"

    def statuses(self) -> dict[str, int]:
        """How many answers of each status (``0``: none, the connection ended)."""
        counts: dict[str, int] = {}
        with self._lock:
            for history in self.pushes.values():
                for _, status in history.answers:
                    counts[str(status)] = counts.get(str(status), 0) + 1
        return counts
