"""``utxoiq-worker run``: the pull worker, one asyncio process for its topics (one of
those ``worker.supervisor`` runs, one per core by default).

It also serves ``/healthz`` and ``/readyz`` on ``PORT`` (``worker.http.health``) so
that Cloud Run can probe it: ready once pulling and while its dependencies answer,
not ready from the stop signal on.

Shutdown (SIGTERM or SIGINT) fits Cloud Run's 10 s: stop pulling (pulls in flight
return within ``pull_timeout_s``), flush and commit what was received, ack it; what
cannot be committed in the budget is nacked, so nothing is lost and no ack is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import Sequence

from worker.config import Settings
from worker.http.health import ProbeServer, Readiness, probe_app, readiness
from worker.pipeline.crash_points import CrashPoints
from worker.pipeline.settings import BatchSettings
from worker.runtime import Runtime, tune_garbage_collector
from worker.sources.pull import PullSource
from worker.sources.settings import PullSettings
from worker.supervisor import report_ready
from worker.topics import Registry

log = logging.getLogger(__name__)

SHUTDOWN_BUDGET_S = 9.0
PULL_LOOP_CHECK_S = 1.0


class PullWorker:
    """A pull source per chosen topic, feeding the runtime's pipelines."""

    def __init__(
        self, runtime: Runtime, topics: Sequence[str], pull: PullSettings | None = None
    ) -> None:
        self.runtime = runtime
        self.topics = tuple(topics)
        self.pull = pull or PullSettings()
        self.sources: list[PullSource] = []
        self.stopping = False

    async def start(self) -> None:
        """Run the topics' start-up hooks, then pull."""
        await self.runtime.prepare(self.topics)
        self.sources = [
            PullSource(
                self.runtime.pubsub,
                self.runtime.registry[name].subscription,
                self.runtime.pipeline(name),
                self.pull,
            )
            for name in self.topics
        ]
        for source in self.sources:
            source.start()
        log.info("worker started", extra={"topics": list(self.topics)})

    def alive(self) -> bool:
        """No pull source ended (before the stop, or while starting)."""
        return self.stopping or not self.sources or all(s.running for s in self.sources)

    async def readiness(self) -> Readiness:
        """Pulling, not stopping, and the database, Redis and Pub/Sub answer."""
        pulling = bool(self.sources) and not self.stopping
        if not pulling:
            return Readiness({"pulling": False})
        found = await readiness(self.runtime)
        return Readiness({"pulling": pulling, **found.checks})

    async def stop(self, budget_s: float = SHUTDOWN_BUDGET_S) -> None:
        """Stop pulling, commit what was received, send the last acks and nacks.

        The runtime stays open: whoever made it closes it.
        """
        self.stopping = True
        deadline = time.monotonic() + budget_s
        await asyncio.gather(*(s.stop_pulling() for s in self.sources))
        # Leave a second for the final acks and nacks.
        nacked = await self.runtime.drain(max(0.5, deadline - time.monotonic() - 1.0))
        await asyncio.gather(*(s.close() for s in self.sources))
        log.info(
            "worker stopped",
            extra={
                "nacked_at_stop": nacked,
                "stop_s": round(budget_s - (deadline - time.monotonic()), 2),
            },
        )


async def run_worker(
    settings: Settings,
    registry: Registry,
    topics: Sequence[str],
    sock: socket.socket,
    batch: BatchSettings | None = None,
    pull: PullSettings | None = None,
    ready_fd: int | None = None,
) -> int:
    """Pull ``topics`` until SIGTERM or SIGINT, then drain and exit 0; probes answer on
    ``sock`` meanwhile. ``ready_fd``: the supervisor's, told once pulling (None: this
    process alone serves the port)."""
    tune_garbage_collector()
    # WORKER_CRASH_AT is read once, here (tests only; unset in production).
    runtime = Runtime(settings, registry, crash_points=CrashPoints.from_env(), batch=batch)
    worker = PullWorker(runtime, topics, pull)
    probes = ProbeServer(probe_app(worker.alive, worker.readiness), sock)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await probes.start()
    except BaseException:
        await runtime.close()
        raise
    dead = asyncio.Event()
    watching: asyncio.Task[None] | None = None
    try:
        await worker.start()
        report_ready(ready_fd, sock)
        if ready_fd is not None:
            # A probe reaches one process of several: one whose pull loop ended exits
            # instead, and its supervisor starts it again.
            watching = asyncio.create_task(_stop_when_dead(worker, stop, dead))
        await stop.wait()
        if not dead.is_set():
            log.info("stop signal received, draining")
    finally:
        if watching is not None:
            watching.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        await worker.stop()
        await probes.stop()
        await runtime.close()
    return 1 if dead.is_set() else 0


async def _stop_when_dead(worker: PullWorker, stop: asyncio.Event, dead: asyncio.Event) -> None:
    # Polled: a pull loop ends rarely (never, short of a bug), and a second late is fine.
    while worker.alive():  # noqa: ASYNC110
        await asyncio.sleep(PULL_LOOP_CHECK_S)
    log.error("a pull loop ended: stopping this process (its supervisor starts it again)")
    dead.set()
    stop.set()
