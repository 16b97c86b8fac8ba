"""``utxoiq-worker serve``: the HTTP app on a listening socket, one process of those
``worker.supervisor`` runs on ``PORT`` (Cloud Run's contract).

uvicorn owns the signals: on SIGTERM it stops accepting, lets requests in flight
finish within ``GRACEFUL_SHUTDOWN_S`` (Cloud Run allows 10 s) and exits 0.
"""

from __future__ import annotations

import signal
import socket

import uvicorn
from starlette.types import ASGIApp

from worker.config import Settings
from worker.http.app import create_app, push_verifier
from worker.http.limits import HeadLimits
from worker.http.services import Services
from worker.pipeline.crash_points import CrashPoints
from worker.runtime import tune_garbage_collector
from worker.supervisor import report_ready
from worker.telemetry import create_telemetry
from worker.topics import Registry

GRACEFUL_SHUTDOWN_S = 8


def server_config(
    app: ASGIApp, port: int, host: str = "0.0.0.0", limits: HeadLimits | None = None
) -> uvicorn.Config:
    """uvicorn's configuration of ``serve`` (tests serve the app with it too)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        # httptools, with the limits on a request's head that uvicorn lacks.
        http=(limits or HeadLimits()).protocol(),
        log_config=None,  # our JSON-line logging stays in charge
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )


async def serve(
    settings: Settings, registry: Registry, sock: socket.socket, ready_fd: int | None = None
) -> int:
    """Serve on ``sock`` until SIGTERM; refuses to start with PUSH_AUTH=required and no
    audience. ``ready_fd``: the supervisor's (None: this process alone serves the port)."""
    # WORKER_CRASH_AT is read once, here (tests only; unset in production).
    crash_points = CrashPoints.from_env()
    telemetry = create_telemetry()
    app = create_app(
        lambda: Services.create(settings, registry, crash_points=crash_points, telemetry=telemetry),
        push_verifier(settings),
        telemetry,
    )
    host, port = sock.getsockname()[:2]
    server = AnnouncingServer(server_config(app, port, host), sock, ready_fd)
    tune_garbage_collector()
    # Once shut down, uvicorn raises the signal that stopped it again, for the handler
    # it found: the default one would kill the process (exit 143, not 0). Take it here.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        await server.serve(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


class AnnouncingServer(uvicorn.Server):
    """uvicorn on ``sock``, saying when it serves (``report_ready``)."""

    def __init__(self, config: uvicorn.Config, sock: socket.socket, ready_fd: int | None) -> None:
        super().__init__(config)
        self._sock = sock
        self._ready_fd = ready_fd

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:  # otherwise the lifespan failed: the process exits
            report_ready(self._ready_fd, self._sock)
