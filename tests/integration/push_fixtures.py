"""Helpers of the push tests: envelopes, the in-process app, its batch counts.

The app runs in the test's event loop: its lifespan is entered by hand and requests
go through ``httpx.ASGITransport`` (no socket).
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import httpx
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from worker.api import Services, create_app
from worker.config import Settings
from worker.oidc import PushVerifier
from worker.pipeline import BatchSettings
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
        self.services = Services.create(settings, batch, telemetry)

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
    ``fastapi_route``: pushes go to the FastAPI route that documents ``/push/{topic}``
    instead of the ASGI-level endpoint that serves it (both must answer alike).
    """
    app = create_app(settings, services, verifier=verifier)
    if fastapi_route:
        app.push_endpoint = None
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
