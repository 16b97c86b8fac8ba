"""The HTTP app that ``utxoiq-worker serve`` runs: push intake, health, readiness and
the read API (``worker.http.read_routes``); errors as ``worker.http.errors`` says."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from worker.config import Settings
from worker.http import errors, read_routes
from worker.http.health import readiness
from worker.http.oidc import PushVerifier
from worker.http.push_endpoint import PushEndpoint, answer, push_topic, read_capped
from worker.http.services import Services, services, services_of
from worker.http.stats_read import ROUTE as STATS_ROUTE
from worker.http.stats_read import StatsRead, stats_insight_id
from worker.instrumentation import instrument_app, instrument_route
from worker.telemetry import Telemetry

log = logging.getLogger(__name__)

PUSH_RESPONSES: dict[int | str, dict[str, str]] = {
    400: {"description": "not a push envelope"},
    401: {"description": "no or invalid token"},
    403: {"description": "a valid token of another identity"},
    404: {"description": "no handler for this topic"},
    408: {"description": "body not received in time"},
    413: {"description": "body over 16 MiB"},
    415: {"description": "not application/json"},
    503: {"description": "transient failure: Pub/Sub retries"},
}


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


class WorkerApp(FastAPI):
    """The FastAPI app, with push requests and stats reads answered before Starlette's
    stack (see ``worker.http.push_endpoint`` and ``worker.http.stats_read``)."""

    push_endpoint: PushEndpoint | None = None
    stats_read: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.push_endpoint
        topic = None if endpoint is None else push_topic(scope)
        if endpoint is not None and topic is not None:
            await endpoint(topic, scope, receive, send)
        elif self.stats_read is not None and (insight_id := stats_insight_id(scope)):
            scope["path_params"] = {"insight_id": insight_id}  # as Starlette's router does
            await self.stats_read(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def create_app(
    build: Callable[[], Services] | Services,
    verifier: PushVerifier | None,
    telemetry: Telemetry | None = None,
) -> WorkerApp:
    """The app over the services ``build`` makes when it starts (closed when it stops),
    or over given ``Services`` (left open: the caller owns them). ``verifier`` checks
    push tokens; None turns push authentication off (the emulator). With an exporting
    ``telemetry``, the read routes make server spans and metrics (pushes have their
    batch's span)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = callable(build)
        app.state.services = current = build() if callable(build) else build
        warning = None if verifier else asyncio.create_task(_warn_push_auth_disabled())
        await current.push.start()
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
        description="Push intake, health, readiness and the cache-aside read API.",
    )
    errors.install(app)
    _add_push_route(app, verifier)
    _add_health_routes(app)
    app.include_router(read_routes.router)
    app.push_endpoint = PushEndpoint(lambda: services_of(app).push, verifier)
    stats_route = next(
        r for r in read_routes.router.routes if getattr(r, "path", "") == STATS_ROUTE
    )
    app.stats_read = StatsRead(lambda: services_of(app).reads, stats_route)
    if telemetry is not None and telemetry.exporting:
        instrument_app(app, telemetry)
        app.stats_read = instrument_route(app.stats_read, "GET", STATS_ROUTE, telemetry)
    return app


def _add_push_route(app: FastAPI, verifier: PushVerifier | None) -> None:
    @app.post("/push/{topic}", tags=["push"], status_code=204, responses=PUSH_RESPONSES)
    async def push(request: Request, topic: str) -> Response:
        """A Pub/Sub push (wrapped envelope): 204 once committed or dead-lettered."""
        # Served by PushEndpoint in front of the app; this route documents it.

        async def read_body(limit: int) -> bytes | None:
            return await read_capped(request.receive, limit)

        reply = await answer(services(request).push, verifier, topic, request.headers, read_body)
        if reply.error is None:
            return Response(status_code=reply.status)
        return JSONResponse({"error": reply.error, "detail": reply.detail}, reply.status)


def _add_health_routes(app: FastAPI) -> None:
    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"description": "not ready"}})
    async def readyz(request: Request) -> JSONResponse:
        """Database, Redis and Pub/Sub are reachable."""
        return (await readiness(services(request).runtime)).response()
