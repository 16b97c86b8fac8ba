"""Health and readiness, as ``serve`` answers them and as ``run`` does on ``PORT``.

``/healthz``: the process is alive (its event loop answers; for ``run``, no pull loop
ended). ``/readyz``: it can do its work now: PostgreSQL, Redis and Pub/Sub answer.
Cloud Run's startup probe asks ``/readyz`` and its liveness probe ``/healthz``; a pull
worker receives no requests, so these are all it serves (``ProbeServer``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import uvicorn
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from worker.exceptions import StartupError, WorkerError
from worker.pubsub.invalidations import INVALIDATION_TOPIC
from worker.runtime import Runtime
from worker.storage.database import connection

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Readiness:
    checks: dict[str, bool]

    @property
    def ready(self) -> bool:
        return all(self.checks.values())

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"status": "ready" if self.ready else "not_ready", "checks": self.checks},
            status_code=200 if self.ready else 503,
        )


async def readiness(runtime: Runtime) -> Readiness:
    """Whether the runtime's database, Redis and Pub/Sub answer now."""
    return Readiness(
        {
            "database": await _database_ok(runtime),
            "redis": await runtime.cache.ping(),
            "pubsub": await runtime.pubsub.reachable(INVALIDATION_TOPIC),
        }
    )


async def _database_ok(runtime: Runtime) -> bool:
    try:
        async with connection(runtime.engine) as conn:
            await conn.execute(text("SELECT 1"))
    except WorkerError:
        return False
    return True


def probe_app(alive: Callable[[], bool], ready: Callable[[], Awaitable[Readiness]]) -> Starlette:
    """``/healthz`` and ``/readyz`` and nothing else."""

    async def healthz(_: Request) -> JSONResponse:
        ok = alive()
        return JSONResponse({"status": "ok" if ok else "failed"}, status_code=200 if ok else 503)

    async def readyz(_: Request) -> JSONResponse:
        return (await ready()).response()

    return Starlette(routes=[Route("/healthz", healthz), Route("/readyz", readyz)])


class _NoSignals(uvicorn.Server):
    """uvicorn, leaving the signals to the process it runs in (``run`` drains on them)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ProbeServer:
    """``probe_app`` served on a listening socket in the running event loop."""

    def __init__(self, app: Starlette, sock: socket.socket) -> None:
        host, port = sock.getsockname()[:2]
        config = uvicorn.Config(
            app, host=host, port=port, log_config=None, access_log=False, lifespan="off"
        )
        self._server = _NoSignals(config)
        self._sock = sock
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Serving once this returns."""
        self._task = asyncio.create_task(
            self._server.serve(sockets=[self._sock]), name="probe-server"
        )
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise StartupError("the probe server stopped before it served")
            await asyncio.sleep(0.01)
        log.info("probes listening", extra={"port": self.port})

    @property
    def port(self) -> int:
        """The port listened on (the one chosen when ``PORT`` is 0)."""
        return int(self._sock.getsockname()[1])

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task
