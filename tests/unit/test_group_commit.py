"""Group commit: a batch gathers while another one commits, and goes as soon as the
database is free, without waiting for the batch delay, even while the batch before
it is still publishing its invalidations."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from tests.support.fakes import Fussy, PipelineRun
from worker.pipeline.handler import BatchOutcome
from worker.pipeline.settings import BatchSettings

GROUP_COMMIT = BatchSettings(max_batch_delay_ms=60_000)
"""Flush when idle, and a delay no test waits for: a batch that goes, went early."""


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


async def _no_invalidations(topic: str, keys: frozenset[str]) -> None:
    return None


async def test_a_batch_gathers_behind_a_commit_then_goes_at_once() -> None:
    handler = Held()
    run = PipelineRun(handler, after_commit=_no_invalidations, settings=GROUP_COMMIT)
    async with run.running(), asyncio.timeout(5):
        run.submit("a", b'{"id": "a"}')
        await handler.started.wait()  # alone and idle: flushed at once
        run.submit("b", b'{"id": "b"}')
        run.submit("c", b'{"id": "c"}')
        await asyncio.sleep(0.05)
        assert handler.batches == [[b"a"]]  # b and c wait behind a's commit
        handler.release.set()
        await run.wait_until(lambda: len(run.settled.acked) == 3)
    assert handler.batches == [[b"a"], [b"b", b"c"]]  # one batch, well before the delay


async def test_the_next_batch_commits_while_the_last_one_invalidates() -> None:
    invalidating, let_invalidations_go = asyncio.Event(), asyncio.Event()

    async def invalidate(topic: str, keys: frozenset[str]) -> None:
        invalidating.set()
        await let_invalidations_go.wait()

    run = PipelineRun(Fussy(), after_commit=invalidate, settings=GROUP_COMMIT)
    async with run.running(), asyncio.timeout(5):
        run.submit("a", b'{"id": "a"}')
        await invalidating.wait()  # a committed, its invalidations still out
        run.submit("b", b'{"id": "b"}')
        await run.wait_until(lambda: b"b" in run.handler.applied)
        assert run.settled.acked == []  # neither is acked before its invalidations
        let_invalidations_go.set()
        await run.wait_until(lambda: len(run.settled.acked) == 2)
    assert sorted(run.settled.acked) == ["a", "b"]
