"""``utxoiq-worker run``: the pull worker, one asyncio process for every topic.

Shutdown (SIGTERM or SIGINT) fits Cloud Run's 10 s: stop pulling (pulls in flight
return within ``pull_timeout_s``), flush and commit what was received, ack it; what
cannot be committed in the budget is nacked, so nothing is lost and no ack is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from handlers import build_handlers
from handlers.metrics import ensure_months_ahead
from worker.config import Settings
from worker.pipeline.batching import BatchSettings, TopicPipeline
from worker.pipeline.crash_points import CrashPoints
from worker.pipeline.dead_letters import DeadLetterPublisher
from worker.pubsub.client import PubSub
from worker.pubsub.invalidations import INVALIDATION_TOPIC, InvalidationPublisher
from worker.pubsub.topology import RUN_TOPICS, spec_for
from worker.sources.pull import PullSettings, PullSource
from worker.storage.cache import Cache, create_redis
from worker.storage.database import create_engine
from worker.telemetry import Telemetry, create_telemetry

log = logging.getLogger(__name__)

SHUTDOWN_BUDGET_S = 9.0


@dataclass(frozen=True)
class RunOptions:
    topics: Sequence[str] = RUN_TOPICS
    batch: BatchSettings = field(default_factory=BatchSettings)
    pull: PullSettings = field(default_factory=PullSettings)


class Worker:
    """Pipelines and pull sources for the chosen topics, on shared resources."""

    def __init__(
        self,
        settings: Settings,
        options: RunOptions,
        telemetry: Telemetry | None = None,
        crash_points: CrashPoints | None = None,
    ) -> None:
        self.settings = settings
        self.options = options
        self.telemetry = telemetry or create_telemetry()
        self.engine = create_engine(settings)
        self.pubsub = PubSub(settings)
        dead_letters = DeadLetterPublisher(self.pubsub)
        # Redis is only needed by the updater; ingestion never waits for it.
        self.cache = Cache(create_redis(settings)) if INVALIDATION_TOPIC in options.topics else None
        handlers = build_handlers(settings, self.cache)
        # Every committed ingest batch names its cache keys on cache-invalidation,
        # whether or not this process also runs the updater.
        publish_invalidations = InvalidationPublisher(self.pubsub)
        self.pipelines = [
            TopicPipeline(
                handlers[topic],
                self.engine,
                dead_letters,
                self.telemetry,
                options.batch,
                # The updater's batches name no cache keys: it never publishes any.
                after_commit=publish_invalidations,
                crash_points=crash_points,
            )
            for topic in options.topics
        ]
        self.sources = [
            PullSource(self.pubsub, spec_for(p.topic).subscription, p, options.pull)
            for p in self.pipelines
        ]
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(p.run(), name=f"pipeline-{p.topic}") for p in self.pipelines
        ]
        for source in self.sources:
            source.start()
        log.info("worker started", extra={"topics": list(self.options.topics)})

    async def stop(self, budget_s: float = SHUTDOWN_BUDGET_S) -> None:
        deadline = time.monotonic() + budget_s
        await asyncio.gather(*(s.stop_pulling() for s in self.sources))
        drains = [asyncio.create_task(p.drain()) for p in self.pipelines]
        # Leave a second for the final acks and nacks.
        remaining = max(0.5, deadline - time.monotonic() - 1.0)
        _done, pending = await asyncio.wait(drains, timeout=remaining)
        for task in pending:
            task.cancel()
        await asyncio.gather(*drains, return_exceptions=True)
        nacked = sum(p.nack_pending() for p in self.pipelines)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(s.close() for s in self.sources))
        await self.pubsub.close()
        await self.engine.dispose()
        if self.cache is not None:
            await self.cache.close()
        self.telemetry.shutdown()
        log.info(
            "worker stopped",
            extra={
                "nacked_at_stop": nacked,
                "stop_s": round(budget_s - (deadline - time.monotonic()), 2),
            },
        )


def tune_garbage_collector() -> None:
    """Fewer cyclic-GC passes: the worker allocates millions of short-lived, acyclic
    objects (payload models, rows), and with the default thresholds the collector's
    full passes over a heap of in-flight batches cost more than the validation."""
    gc.freeze()  # what start-up allocated is never garbage: skip it in every pass
    gc.set_threshold(50_000, 50, 100)


async def run_worker(settings: Settings, options: RunOptions) -> int:
    tune_garbage_collector()
    # Read once, here: a test-only setting that no batch looks up again.
    worker = Worker(settings, options, crash_points=CrashPoints.from_env())
    await ensure_months_ahead(worker.engine)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    worker.start()
    try:
        await stop.wait()
        log.info("stop signal received, draining")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        await worker.stop()
    return 0
