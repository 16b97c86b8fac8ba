"""PostgreSQL, Redis and HTTP spans from OpenTelemetry's own instrumentation packages.

asyncpg and redis are instrumented by patching their classes: once per process, with
the first exporting runtime's tracer provider (a process runs one runtime; tests that
build many instrument explicitly and undo it). The HTTP app is instrumented per app.
Probe paths make no spans or metrics: Cloud Run asks them every few seconds.
"""

from __future__ import annotations

from typing import Any

from worker.telemetry import Telemetry

EXCLUDED_URLS = "/healthz$,/readyz$"

_instrumented: list[Any] = []


def instrument_clients(telemetry: Telemetry) -> None:
    """asyncpg and redis calls make spans on ``telemetry``'s tracer provider (the first
    call in a process wins; later ones do nothing)."""
    if _instrumented:
        return
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    for instrumentor in (AsyncPGInstrumentor(), RedisInstrumentor()):  # type: ignore[no-untyped-call]
        instrumentor.instrument(tracer_provider=telemetry.tracer_provider)
        _instrumented.append(instrumentor)


def uninstrument_clients() -> None:
    """Undo ``instrument_clients`` (tests)."""
    while _instrumented:
        _instrumented.pop().uninstrument()


def instrument_app(app: Any, telemetry: Telemetry) -> None:
    """Server spans and ``http.server`` metrics for the FastAPI ``app``'s routes."""
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=telemetry.tracer_provider,
        meter_provider=telemetry.meter_provider,
        excluded_urls=EXCLUDED_URLS,
    )


def instrument_route(app: Any, method: str, route: str, telemetry: Telemetry) -> Any:
    """``app`` (an ASGI app serving one route outside FastAPI's stack) with the server
    span and ``http.server`` metrics ``instrument_app`` gives the app's own routes: the
    same ASGI middleware, named after the route (its scope is the ASGI
    instrumentation's rather than FastAPI's)."""
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.semconv.attributes.http_attributes import HTTP_ROUTE

    span_name, attributes = f"{method} {route}", {HTTP_ROUTE: route}
    return OpenTelemetryMiddleware(
        app,
        default_span_details=lambda scope: (span_name, attributes),
        tracer_provider=telemetry.tracer_provider,
        meter_provider=telemetry.meter_provider,
    )
