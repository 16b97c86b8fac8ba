"""Helpers of the push tests: envelopes, the in-process app, its batch counts, and
the app served on a socket for what only a real server shows.

``app_client``: the app runs in the test's event loop, its lifespan entered by hand,
requests through ``httpx.ASGITransport`` (no socket). ``served``: the app under
uvicorn, configured as ``utxoiq-worker serve`` configures it, in a thread with its own
loop; ``exchange`` talks raw HTTP/1.1 to it (heads no HTTP client would send).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import uvicorn
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.topics import REGISTRY
from worker.config import Settings
from worker.http.app import create_app
from worker.http.limits import HeadLimits
from worker.http.oidc import PushVerifier
from worker.http.serve import server_config
from worker.http.services import Services
from worker.pipeline.settings import BatchSettings
from worker.telemetry import create_telemetry

TABLES = ("system_metrics", "insight_feedback", "backfill_jobs")


def envelope(
    data: bytes | str | Mapping[str, Any],
    *,
    message_id: str | None = None,
    attributes: Mapping[str, str] | None = None,
    subscription: str = "projects/test/subscriptions/metrics-worker",
    snake_case: bool = False,
) -> dict[str, Any]:
    """A wrapped push envelope; ``data`` bytes are base64-encoded, text is sent as is.

    ``snake_case`` gives the emulator's spelling (``message_id``, ``publish_time``).
    """
    if isinstance(data, Mapping):
        data = json.dumps(data).encode("utf-8")
    encoded = base64.b64encode(data).decode("ascii") if isinstance(data, bytes) else data
    published = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    ident = message_id or str(uuid.uuid4().int % 10**16)
    message: dict[str, Any] = {"data": encoded, "attributes": dict(attributes or {})}
    if snake_case:
        message.update(message_id=ident, publish_time=published)
    else:
        message.update(messageId=ident, publishTime=published)
    return {"message": message, "subscription": subscription}


def encoded(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body).encode("utf-8")


class PushServices:
    """``Services`` as ``Services.create`` builds them, with an in-memory metric reader."""

    def __init__(self, settings: Settings, batch: BatchSettings | None = None) -> None:
        self.reader = InMemoryMetricReader()
        telemetry = create_telemetry(extra_readers=[self.reader])
        self.services = Services.create(settings, REGISTRY, batch, telemetry)

    def batches(self, topic: str) -> int:
        """How many batches of ``topic`` were applied (``worker.batch.size`` count)."""
        return int(sum(p.count for p in self._histogram_points("worker.batch.size", topic)))

    def counter(self, name: str, topic: str) -> int:
        """A ``worker.messages.*`` counter of ``topic`` (0 if never touched)."""
        data = self.reader.get_metrics_data()
        total = 0
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name != f"worker.messages.{name}":
                        continue
                    for point in metric.data.data_points:
                        if (
                            isinstance(point, NumberDataPoint)
                            and (point.attributes or {}).get("topic") == topic
                        ):
                            total += int(point.value)
        return total

    def _histogram_points(self, name: str, topic: str) -> list[HistogramDataPoint]:
        data = self.reader.get_metrics_data()
        points: list[HistogramDataPoint] = []
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name != name:
                        continue
                    points.extend(
                        p
                        for p in metric.data.data_points
                        if isinstance(p, HistogramDataPoint)
                        and (p.attributes or {}).get("topic") == topic
                    )
        return points


@asynccontextmanager
async def app_client(
    settings: Settings,
    services: Services | None = None,
    verifier: PushVerifier | None = None,
    *,
    fastapi_route: bool = False,
) -> AsyncIterator[httpx.AsyncClient]:
    """The app started (lifespan entered) in this loop; a client bound to it in-process.

    ``services`` are closed on exit; ``verifier=None`` turns push auth off.
    ``fastapi_route``: pushes and stats reads go to the FastAPI routes that document
    ``/push/{topic}`` and ``/v1/feedback/{insight_id}/stats`` instead of the ASGI-level
    apps that serve them (both must answer alike).
    """
    app = create_app(services or (lambda: Services.create(settings, REGISTRY)), verifier)
    if fastapi_route:
        app.push_endpoint = None
        app.stats_read = None
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://worker.test", timeout=60
            ) as client:
                yield client
    finally:
        if services is not None:
            await services.close()


async def row_counts(engine: AsyncEngine) -> dict[str, int]:
    async with engine.connect() as conn:
        return {
            table: int((await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one())
            for table in TABLES
        }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def served(app: Any, limits: HeadLimits | None = None) -> Iterator[int]:
    """``app`` under uvicorn as ``serve`` configures it (a thread, its own loop); its port."""
    port = free_port()
    server = uvicorn.Server(server_config(app, port, "127.0.0.1", limits))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "uvicorn stopped before it started"
        assert time.monotonic() < deadline, "uvicorn did not start within 30 s"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "uvicorn did not stop"


@dataclass
class Exchange:
    """What came back on one raw connection, and when the server closed it."""

    received: bytes = b""
    sent_bytes: int = 0
    closed_after_s: float | None = None  # None: still open when the test stopped waiting
    statuses: list[int] = field(default_factory=list)

    def body(self) -> Any:
        """The JSON body of the first response (``content-length`` framed)."""
        head, _, rest = self.received.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        return json.loads(rest[:length])

    def header(self, name: str) -> str | None:
        head = self.received.partition(b"\r\n\r\n")[0].decode("latin-1")
        for line in head.split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name:
                return value.strip()
        return None


async def exchange(
    port: int,
    pieces: AsyncIterator[bytes] | list[bytes],
    wait_s: float,
    *,
    stop_when_answered: bool = True,
) -> Exchange:
    """Send ``pieces`` on a fresh connection while reading whatever comes back, until
    the server closes it or ``wait_s`` passes. Sending stops at a write error (the
    server closed its end) and, with ``stop_when_answered``, at the first byte back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    result = Exchange()
    started = time.monotonic()
    answered = asyncio.Event()

    async def send() -> None:
        try:
            if isinstance(pieces, list):
                for piece in pieces:
                    writer.write(piece)
                    result.sent_bytes += len(piece)
                await writer.drain()
                return
            async for piece in pieces:
                if stop_when_answered and answered.is_set():
                    return
                writer.write(piece)
                await writer.drain()
                result.sent_bytes += len(piece)
        except (ConnectionError, OSError):
            return

    sender = asyncio.create_task(send())
    try:
        async with asyncio.timeout(wait_s):
            while True:
                try:
                    chunk = await reader.read(65536)
                except (ConnectionError, OSError):
                    chunk = b""
                if not chunk:
                    result.closed_after_s = time.monotonic() - started
                    break
                answered.set()
                result.received += chunk
    except TimeoutError:
        pass
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        writer.close()
    result.statuses = [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", result.received)]
    return result
