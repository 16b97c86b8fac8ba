"""The naive push endpoint, the baseline of scenario ``push``: one transaction per request.

``python -m bench.naive_push`` serves ``POST /push/metrics`` on ``PORT`` with uvicorn:
it decodes the envelope, validates the sample with ``MetricSample`` and writes it
through ``DatabaseService.record_metrics_batch`` (the worker's own SQL) in a
transaction of its own before answering 204. No coalescing, no dead letters, no
cache invalidations: everything the real endpoint does besides batching is left out,
so the comparison flatters the baseline if anything.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from schemas.metrics import MetricSample
from worker.config import Settings
from worker.read.service import DatabaseService
from worker.storage.database import create_engine


def create_naive_app(settings: Settings) -> Starlette:
    engine = create_engine(settings)
    db = DatabaseService(engine, None)

    async def push(request: Request) -> Response:
        envelope = orjson.loads(await request.body())
        data = base64.b64decode(envelope["message"]["data"], validate=True)
        sample = MetricSample.model_validate_json(data)
        await db.record_metrics_batch([sample])
        return Response(status_code=204)

    async def healthz(request: Request) -> Response:
        return Response(status_code=200)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await engine.dispose()

    return Starlette(
        routes=[
            Route("/push/metrics", push, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


def main() -> None:
    settings = Settings.from_env()
    uvicorn.run(
        create_naive_app(settings),
        host="127.0.0.1",
        port=settings.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
