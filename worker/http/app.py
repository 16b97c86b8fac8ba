"""The HTTP app that ``utxoiq-worker serve`` runs: health, readiness, the read API.

Every ``/v1`` read goes through the cache-aside path (``worker.read.cached``). Errors are
JSON: 404 ``{"error": "not_found", "detail": ...}``, 422 with the offending field named
in ``detail[].loc`` (FastAPI's validation format), 503 when a dependency is down.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Literal

from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import Receive, Scope, Send

from handlers import build_handlers
from schemas.backfill import BackfillJobResponse, BackfillStatus
from schemas.feedback import FeedbackStats
from schemas.metrics import MetricAggregate, MetricPoint, MetricRecord
from worker.config import Settings
from worker.exceptions import NotFoundError, ValidationError, WorkerError
from worker.http.oidc import PushVerifier
from worker.http.params import IN_UTC, NO_NUL
from worker.http.push_endpoint import PushEndpoint, answer, push_topic, read_capped
from worker.pipeline.batching import BatchSettings
from worker.pipeline.crash_points import CrashPoints
from worker.pipeline.dead_letters import DeadLetterPublisher
from worker.pubsub.client import PubSub
from worker.pubsub.invalidations import InvalidationPublisher
from worker.read.cached import CacheService
from worker.read.service import DatabaseService
from worker.sources.push import PushIngest
from worker.storage.cache import Cache, create_redis
from worker.storage.database import connection, create_engine
from worker.telemetry import Telemetry, create_telemetry

log = logging.getLogger(__name__)


@dataclass
class Services:
    engine: AsyncEngine
    db: DatabaseService
    cache: Cache
    reads: CacheService
    pubsub: PubSub
    push: PushIngest
    telemetry: Telemetry

    @classmethod
    def create(
        cls,
        settings: Settings,
        batch: BatchSettings | None = None,
        telemetry: Telemetry | None = None,
        crash_points: CrashPoints | None = None,
    ) -> Services:
        engine = create_engine(settings)
        db = DatabaseService(engine)
        cache = Cache(create_redis(settings))
        pubsub = PubSub(settings)
        telemetry = telemetry or create_telemetry()
        push = PushIngest(
            build_handlers(settings, cache),
            engine,
            DeadLetterPublisher(pubsub),
            telemetry,
            InvalidationPublisher(pubsub),
            batch,
            crash_points,
        )
        return cls(engine, db, cache, CacheService(cache, db), pubsub, push, telemetry)

    async def close(self) -> None:
        await self.cache.close()
        await self.pubsub.close()
        await self.engine.dispose()
        self.telemetry.shutdown()


def push_verifier(settings: Settings) -> PushVerifier | None:
    """The OIDC verifier ``PUSH_AUTH`` asks for (None when disabled)."""
    if settings.push_auth == "disabled":
        return None
    if not settings.push_audience:
        raise ValueError("PUSH_AUTH=required needs PUSH_AUDIENCE (or PUSH_AUTH=disabled)")
    if not settings.push_service_accounts:
        raise ValueError("PUSH_AUTH=required needs PUSH_SERVICE_ACCOUNTS")
    return PushVerifier(settings.push_audience, settings.push_service_accounts)


async def _warn_push_auth_disabled() -> None:
    while True:
        log.warning("PUSH_AUTH=disabled: push requests are NOT authenticated (emulator only)")
        await asyncio.sleep(60)


def _services(request: Request) -> Services:
    return _services_of(request.app)


def _services_of(app: FastAPI) -> Services:
    services: Services = app.state.services
    return services


class WorkerApp(FastAPI):
    """The FastAPI app, with push requests answered before Starlette's stack
    (see ``worker.http.push_endpoint``)."""

    push_endpoint: PushEndpoint | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.push_endpoint
        topic = None if endpoint is None else push_topic(scope)
        if endpoint is None or topic is None:
            await super().__call__(scope, receive, send)
            return
        await endpoint(topic, scope, receive, send)


def create_app(
    settings: Settings,
    services: Services | None = None,
    verifier: PushVerifier | Literal["from-settings"] | None = "from-settings",
    crash_points: CrashPoints | None = None,
) -> WorkerApp:
    """The app; ``verifier`` defaults to what ``PUSH_AUTH`` asks for (tests inject one).

    ``crash_points`` (tests only) reach the push pipelines of the services it creates.
    """
    push_auth = push_verifier(settings) if verifier == "from-settings" else verifier

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = services is None
        app.state.services = current = services or Services.create(
            settings, crash_points=crash_points
        )
        warning = None if push_auth else asyncio.create_task(_warn_push_auth_disabled())
        current.push.start()
        try:
            yield
        finally:
            if warning:
                warning.cancel()
            # Requests in flight were answered (uvicorn waits for them); commit the rest.
            await current.push.stop()
            if owned:
                await current.close()

    app = WorkerApp(
        title="utxoIQ persistence worker",
        version="0.1.0",
        lifespan=lifespan,
        description="Health, readiness and the cache-aside read API of the worker.",
    )

    @app.exception_handler(NotFoundError)
    async def not_found(request: Request, error: NotFoundError) -> JSONResponse:
        return JSONResponse({"error": "not_found", "detail": str(error)}, status_code=404)

    @app.exception_handler(RequestValidationError)
    async def unprocessable(request: Request, error: RequestValidationError) -> JSONResponse:
        # FastAPI's format without "input" and "ctx": an error never echoes the request.
        detail = [
            {"type": e.get("type"), "loc": e.get("loc"), "msg": e.get("msg")}
            for e in error.errors()
        ]
        return JSONResponse({"error": "invalid", "detail": detail}, status_code=422)

    @app.exception_handler(ValidationError)
    async def invalid(request: Request, error: ValidationError) -> JSONResponse:
        field, _, message = error.detail.partition(": ")
        # The routes' own checks read "field: message"; one translated from a driver
        # error (it has a cause) carries the database's text, which stays in the log.
        if error.__cause__ is not None or not field.isidentifier():
            log.warning(
                "value refused by the database",
                extra={"path": request.url.path, "error": error.detail[:500]},
            )
            refused = {"loc": ["request"], "msg": "a parameter holds a value that cannot be stored"}
            return JSONResponse({"error": "invalid", "detail": [refused]}, status_code=422)
        return JSONResponse(
            {"error": "invalid", "detail": [{"loc": ["query", field], "msg": message}]},
            status_code=422,
        )

    @app.exception_handler(WorkerError)
    async def unavailable(request: Request, error: WorkerError) -> JSONResponse:
        log.warning(
            "request failed",
            extra={
                "path": request.url.path,
                "error_type": type(error).__name__,
                "error": str(error)[:500],
            },
        )
        return JSONResponse(
            {"error": "unavailable", "detail": "a dependency is unavailable; retry"},
            status_code=503,
        )

    @app.post(
        "/push/{topic}",
        tags=["push"],
        status_code=204,
        responses={
            400: {"description": "not a push envelope"},
            401: {"description": "no or invalid token"},
            403: {"description": "a valid token of another identity"},
            404: {"description": "no handler for this topic"},
            408: {"description": "body not received in time"},
            413: {"description": "body over 16 MiB"},
            415: {"description": "not application/json"},
            503: {"description": "transient failure: Pub/Sub retries"},
        },
    )
    async def push(request: Request, topic: str) -> Response:
        """A Pub/Sub push (wrapped envelope): 204 once committed or dead-lettered."""
        # Served by PushEndpoint in front of the app; this route documents it.

        async def read_body(limit: int) -> bytes | None:
            return await read_capped(request.receive, limit)

        reply = await answer(_services(request).push, push_auth, topic, request.headers, read_body)
        if reply.error is None:
            return Response(status_code=reply.status)
        return JSONResponse({"error": reply.error, "detail": reply.detail}, reply.status)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"description": "not ready"}})
    async def readyz(request: Request) -> JSONResponse:
        """Database, Redis and Pub/Sub are reachable."""
        services = _services(request)
        checks = {
            "database": await _database_ok(services.engine),
            "redis": await services.cache.ping(),
            "pubsub": await services.pubsub.reachable(),
        }
        ready = all(checks.values())
        return JSONResponse(
            {"status": "ready" if ready else "not_ready", "checks": checks},
            status_code=200 if ready else 503,
        )

    # Cached reads answer with the cached JSON text as is: no parse and re-encode.
    @app.get("/v1/feedback/{insight_id}/stats", tags=["read"], response_model=FeedbackStats)
    async def feedback_stats(
        request: Request, insight_id: Annotated[str, Path(min_length=1, max_length=100), NO_NUL]
    ) -> Response:
        return _json(await _services(request).reads.feedback_stats_json(insight_id))

    @app.get(
        "/v1/backfill-jobs/{job_id}",
        tags=["read"],
        response_model=BackfillJobResponse,
        responses={404: {"description": "unknown job"}},
    )
    async def backfill_job(request: Request, job_id: uuid.UUID) -> Response:
        return _json(await _services(request).reads.backfill_job_json(job_id))

    @app.get("/v1/backfill-jobs", tags=["read"])
    async def backfill_jobs(
        request: Request,
        status: BackfillStatus | None = None,
        job_type: Annotated[str | None, Query(min_length=1, max_length=50), NO_NUL] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    ) -> list[BackfillJobResponse]:
        return await _services(request).db.list_backfill_jobs(status, job_type, limit)

    @app.get(
        "/v1/metrics",
        tags=["read"],
        response_model=list[MetricRecord] | list[MetricAggregate] | list[MetricPoint],
    )
    async def metrics(
        request: Request,
        service_name: Annotated[str, Query(min_length=1, max_length=100), NO_NUL],
        metric_type: Annotated[str | None, Query(min_length=1, max_length=50), NO_NUL] = None,
        start: Annotated[datetime | None, IN_UTC] = None,
        end: Annotated[datetime | None, IN_UTC] = None,
        interval: Literal["hour", "day"] | None = None,
    ) -> list[MetricRecord] | list[MetricAggregate] | list[MetricPoint] | Response:
        """Aggregates with ``interval``; the cached latest 100 samples of a series when
        no range is given; otherwise the samples in ``[start, end)``, newest first."""
        services = _services(request)
        for name, moment in (("start", start), ("end", end)):
            if moment is not None and moment.tzinfo is None:
                raise ValidationError(f"{name}: must carry a UTC offset (RFC 3339)")
        if start is not None and end is not None and end <= start:
            raise ValidationError("end: must be after start")
        if interval is not None:
            if metric_type is None:
                raise ValidationError("metric_type: required with interval")
            return await services.db.aggregate_metrics(
                service_name, metric_type, interval, start, end
            )
        if metric_type is not None and start is None and end is None:
            return _json(await services.reads.recent_metrics_json(service_name, metric_type))
        return await services.db.get_metrics(service_name, metric_type, start, end)

    app.push_endpoint = PushEndpoint(lambda: _services_of(app).push, push_auth)
    return app


def _json(text: str) -> Response:
    return Response(content=text, media_type="application/json")


async def _database_ok(engine: AsyncEngine) -> bool:
    try:
        async with connection(engine) as conn:
            await conn.execute(text("SELECT 1"))
    except WorkerError:
        return False
    return True
