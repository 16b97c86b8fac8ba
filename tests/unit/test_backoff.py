"""The pipeline's pause after transient failures."""

from __future__ import annotations

import asyncio
import time

from worker.pipeline.batching import Backoff


async def test_failures_together_pause_once_not_exponentially() -> None:
    backoff = Backoff(initial_s=0.2, maximum_s=10)
    for _ in range(10):  # a whole wave of in-flight batches failing at once
        backoff.failed()
    started = time.monotonic()
    await backoff.wait()
    assert 0.15 <= time.monotonic() - started < 0.5


async def test_a_failure_after_the_pause_doubles_it() -> None:
    backoff = Backoff(initial_s=0.1, maximum_s=10)
    backoff.failed()
    await backoff.wait()
    backoff.failed()
    started = time.monotonic()
    await backoff.wait()
    assert 0.15 <= time.monotonic() - started < 0.4


async def test_a_success_ends_the_pause_at_once() -> None:
    backoff = Backoff(initial_s=5, maximum_s=10)
    backoff.failed()
    waiting = asyncio.create_task(backoff.wait())
    await asyncio.sleep(0.05)
    backoff.succeeded()
    started = time.monotonic()
    await asyncio.wait_for(waiting, 1)
    assert time.monotonic() - started < 0.5
