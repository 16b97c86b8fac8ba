"""Flow control by bytes: Pub/Sub's pull has no byte limit, so the pull source sizes
each pull from the average message size, and never holds much more than
``max_outstanding_bytes`` however large the messages."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tests.unit.test_leases import FakePipeline, Received
from worker.pull import FIRST_PULL_MESSAGES, PullSettings, PullSource

MESSAGE_BYTES = 100_000
PAYLOAD = b"x" * MESSAGE_BYTES


class EndlessBacklog:
    """Always as many messages as asked for; records what each pull asked."""

    def __init__(self) -> None:
        self.asked: list[int] = []
        self.served = 0

    def subscription(self, name: str) -> str:
        return name

    async def pull(self, subscription: str, count: int, timeout_s: float) -> list[Any]:
        self.asked.append(count)
        await asyncio.sleep(0.001)
        first, self.served = self.served, self.served + count
        return [Received(n, PAYLOAD) for n in range(first, self.served)]

    async def modify_ack_deadline(self, *args: Any) -> None:
        return None

    async def acknowledge(self, *args: Any) -> None:
        return None


class SlowPipeline(FakePipeline):
    """Validation that takes its time: a pull's messages are submitted over several
    slices of the event loop, with sibling pullers running in between."""

    def submit(self, delivery: Any) -> None:
        time.sleep(0.0002)
        super().submit(delivery)


async def pull_until_held(limit_bytes: int) -> EndlessBacklog:
    """Eight pullers on an endless backlog of 100 KB messages until they stop asking
    (nothing is ever settled, so the pipeline holds everything pulled)."""
    backlog = EndlessBacklog()
    settings = PullSettings(pullers=8, max_outstanding_bytes=limit_bytes)
    source = PullSource(backlog, "s", SlowPipeline(), settings)  # type: ignore[arg-type]
    source.start()
    try:
        quiet_polls, seen = 0, -1
        while quiet_polls < 10:  # 100 ms without a new pull: every puller waits for room
            await asyncio.sleep(0.01)
            quiet_polls = quiet_polls + 1 if len(backlog.asked) == seen else 0
            seen = len(backlog.asked)
    finally:
        await source.stop_pulling()
    return backlog


async def test_large_messages_are_pulled_within_the_byte_limit() -> None:
    backlog = await pull_until_held(2_000_000)  # 20 messages of 100 KB
    # Until a size is known, one pull at a time, of a few messages; then pulls sized
    # to the bytes left, however many pullers there are.
    assert backlog.asked[0] == FIRST_PULL_MESSAGES
    held_bytes = backlog.served * MESSAGE_BYTES
    assert held_bytes <= FIRST_PULL_MESSAGES * MESSAGE_BYTES
    assert backlog.asked[1:] == []  # the first pull alone already went over the limit


async def test_pulls_are_sized_to_the_bytes_left() -> None:
    limit_bytes = 30_000_000  # 300 messages of 100 KB
    backlog = await pull_until_held(limit_bytes)
    assert backlog.asked[0] == FIRST_PULL_MESSAGES
    # 8 pullers asking 1000 each would hold 800 MB; the limit holds within one message.
    assert backlog.served * MESSAGE_BYTES <= limit_bytes + MESSAGE_BYTES
    assert backlog.served >= 290
