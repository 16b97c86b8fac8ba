"""Group commit: a batch gathers while another one commits, and goes as soon as the
database is free, without waiting for the batch delay, even while the batch before
it is still publishing its invalidations."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from tests.support.fakes import DeadLetters, Fussy, Settled, delivery
from worker.pipeline.batching import TopicPipeline
from worker.pipeline.handler import BatchOutcome
from worker.pipeline.settings import BatchSettings
from worker.telemetry import create_telemetry

LONG_DELAY_MS = 60_000
"""The batch delay: a test that waited for it would time out long before."""


class Held(Fussy):
    """A handler whose commits wait for the test to let each one go."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[bytes]] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def apply(self, engine: Any, items: Sequence[bytes]) -> BatchOutcome:
        self.batches.append(list(items))
        self.started.set()
        await self.release.wait()
        return await super().apply(engine, items)


def _pipeline(handler: Fussy, settled: Settled, invalidate: Any) -> TopicPipeline:
    return TopicPipeline(
        handler,
        engine=None,  # type: ignore[arg-type]
        dead_letters=DeadLetters(),  # type: ignore[arg-type]
        telemetry=create_telemetry(),
        settings=BatchSettings(max_batch_delay_ms=LONG_DELAY_MS),
        after_commit=invalidate,
    )


async def test_a_batch_gathers_behind_a_commit_then_goes_at_once() -> None:
    handler, settled = Held(), Settled()

    async def invalidate(topic: str, keys: frozenset[str]) -> None:
        return None

    pipeline = _pipeline(handler, settled, invalidate)
    runner = asyncio.create_task(pipeline.run())
    try:
        async with asyncio.timeout(5):
            pipeline.submit(delivery(settled, "a", b'{"id": "a"}'))
            await handler.started.wait()  # alone and idle: flushed at once
            for name in ("b", "c"):
                pipeline.submit(delivery(settled, name, b'{"id": "%s"}' % name.encode()))
            await asyncio.sleep(0.05)
            assert handler.batches == [[b"a"]]  # b and c wait behind a's commit
            handler.release.set()
            while len(settled.acked) < 3:  # noqa: ASYNC110 - fates come from the pipeline task
                await asyncio.sleep(0.005)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    assert handler.batches == [[b"a"], [b"b", b"c"]]  # one batch, well before the delay


async def test_the_next_batch_commits_while_the_last_one_invalidates() -> None:
    handler, settled = Fussy(), Settled()
    invalidating, let_invalidations_go = asyncio.Event(), asyncio.Event()

    async def invalidate(topic: str, keys: frozenset[str]) -> None:
        invalidating.set()
        await let_invalidations_go.wait()

    pipeline = _pipeline(handler, settled, invalidate)
    runner = asyncio.create_task(pipeline.run())
    try:
        async with asyncio.timeout(5):
            pipeline.submit(delivery(settled, "a", b'{"id": "a"}'))
            await invalidating.wait()  # a committed, its invalidations still out
            pipeline.submit(delivery(settled, "b", b'{"id": "b"}'))
            while b"b" not in handler.applied:  # noqa: ASYNC110 - the pipeline task commits it
                await asyncio.sleep(0.005)
            assert settled.acked == []  # neither is acked before its invalidations
            let_invalidations_go.set()
            while len(settled.acked) < 2:  # noqa: ASYNC110 - fates come from the pipeline task
                await asyncio.sleep(0.005)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    assert sorted(settled.acked) == ["a", "b"]
