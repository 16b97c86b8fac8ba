"""``Runtime``: everything one process needs, built in one place and closed in one order.

``run``, ``serve``, ``demo``, the other commands, tests and benchmarks ask a runtime
for the database engine, the Pub/Sub client, the publishers (dead letters, cache
invalidations), the Redis cache, telemetry and each topic's pipeline, instead of
wiring their own. What is never asked for is never built (a pull worker without the
Redis updater opens no Redis connection).

The runtime knows topics only through the registry it is given: it imports no
handler. The read side (``worker.read``) and the commands build on top of it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Iterable

from worker.config import Settings
from worker.exceptions import WorkerError
from worker.instrumentation import instrument_clients
from worker.pipeline.batching import TopicPipeline
from worker.pipeline.crash_points import CrashPoints
from worker.pipeline.dead_letters import DeadLetterPublisher
from worker.pipeline.settings import BatchSettings
from worker.pubsub.client import PubSub
from worker.pubsub.invalidations import InvalidationPublisher
from worker.storage.cache import Cache, create_cache
from worker.storage.database import create_engine, pool_use
from worker.telemetry import Telemetry, create_telemetry
from worker.topics import Registry

log = logging.getLogger(__name__)


class Runtime:
    """Shared resources and per-topic pipelines of one process (see module docstring).

    ``batch`` overrides every topic's batch settings (``run``'s options, benchmarks);
    ``crash_points`` are the tests' crash hooks, disarmed unless given.
    """

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        *,
        telemetry: Telemetry | None = None,
        crash_points: CrashPoints | None = None,
        batch: BatchSettings | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.telemetry = telemetry or create_telemetry()
        if self.telemetry.exporting:
            instrument_clients(self.telemetry)  # spans of PostgreSQL and Redis calls
        self.crash_points = crash_points or CrashPoints.disarmed()
        self.batch = batch
        self.engine = create_engine(settings)
        self.telemetry.observe_pool(lambda: pool_use(self.engine))
        self.pubsub = PubSub(settings)
        self.dead_letters = DeadLetterPublisher(self.pubsub)
        self.invalidations = InvalidationPublisher(self.pubsub)
        self._cache: Cache | None = None
        self._pipelines: dict[str, TopicPipeline] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._prepared: set[str] = set()

    # -- shared resources, built when first asked for ---------------------------------

    @property
    def cache(self) -> Cache:
        if self._cache is None:
            self._cache = create_cache(self.settings, self.telemetry)
        return self._cache

    # -- topics ------------------------------------------------------------------------

    async def prepare(self, topics: Iterable[str]) -> None:
        """Run the start-up hooks of ``topics`` (once each), before consuming them.

        A hook that fails transiently (the database is down) is logged and tried again
        at the next ``prepare``: a process starts, and answers 503 or nacks, rather
        than crash-looping while a dependency is away (hooks only prepare ahead what
        the handlers would otherwise do on demand).
        """
        for name in topics:
            topic = self.registry[name]
            if name in self._prepared:
                continue
            if topic.on_start is not None:
                try:
                    await topic.on_start(self.engine)
                except WorkerError as error:
                    if not error.transient:
                        raise
                    log.warning(
                        "start-up hook failed, going on",
                        extra={"topic": name, "error": str(error)[:500]},
                    )
                    continue
            self._prepared.add(name)

    def pipeline(self, name: str) -> TopicPipeline:
        """The running pipeline of topic ``name`` (built and started on first use)."""
        pipeline = self._pipelines.get(name)
        if pipeline is None:
            topic = self.registry[name]
            pipeline = TopicPipeline(
                topic.build_handler(self),
                self.engine,
                self.dead_letters,
                self.telemetry,
                self.batch or topic.batch,
                after_commit=self.invalidations if topic.invalidates_cache else None,
                crash_points=self.crash_points,
            )
            self._pipelines[name] = pipeline
            self._tasks.append(asyncio.create_task(pipeline.run(), name=f"pipeline-{name}"))
        return pipeline

    @property
    def pipelines(self) -> dict[str, TopicPipeline]:
        """The pipelines built so far, by topic."""
        return dict(self._pipelines)

    def pipelines_running(self) -> bool:
        """Whether every pipeline's flush loop is still alive."""
        return not any(task.done() for task in self._tasks)

    async def drain(self, timeout_s: float | None = None) -> int:
        """Commit what every pipeline holds; past ``timeout_s``, nack the rest (how many)."""
        drains = [asyncio.create_task(p.drain()) for p in self._pipelines.values()]
        if drains:
            _done, pending = await asyncio.wait(drains, timeout=timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*drains, return_exceptions=True)
        return sum(p.nack_pending() for p in self._pipelines.values())

    # -- shutdown ----------------------------------------------------------------------

    async def close(self) -> None:
        """Stop the pipelines, then close Redis, Pub/Sub, the pool and telemetry.

        Sources drain (``drain``) and send their last acks before this: after it, no
        Pub/Sub call can succeed.
        """
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._cache is not None:
            await self._cache.close()
        await self.pubsub.close()
        await self.engine.dispose()
        self.telemetry.shutdown()


def tune_garbage_collector() -> None:
    """Fewer cyclic-GC passes: a worker allocates millions of short-lived, acyclic
    objects (payload models, rows), and with the default thresholds the collector's
    full passes over a heap of in-flight batches cost more than the validation."""
    gc.freeze()  # what start-up allocated is never garbage: skip it in every pass
    gc.set_threshold(50_000, 50, 100)
