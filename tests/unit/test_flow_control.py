"""Flow control by bytes: Pub/Sub's pull has no byte limit, so the pull source sizes
each pull from the average message size, and never holds much more than
``max_outstanding_bytes`` however large the messages."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from tests.unit.test_leases import FakePipeline, Received
from worker.sources.pull import FIRST_PULL_MESSAGES, PullSource
from worker.sources.settings import PullSettings

MESSAGE_BYTES = 100_000
PAYLOAD = b"x" * MESSAGE_BYTES


class FakeSubscription:
    """The pull source's Pub/Sub calls besides ``pull``: settling succeeds and does nothing."""

    def subscription(self, name: str) -> str:
        return name

    async def modify_ack_deadline(self, *args: Any) -> None:
        return None

    async def acknowledge(self, *args: Any) -> None:
        return None


class EndlessBacklog(FakeSubscription):
    """Always as many messages as asked for; records what each pull asked."""

    def __init__(self) -> None:
        self.asked: list[int] = []
        self.served = 0

    async def pull(self, subscription: str, count: int, timeout_s: float) -> list[Any]:
        self.asked.append(count)
        await asyncio.sleep(0.001)
        first, self.served = self.served, self.served + count
        return [Received(n, PAYLOAD) for n in range(first, self.served)]


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


class QuietSubscription(FakeSubscription):
    """Empty until ``publish``: a pull waits out its timeout (a long poll) and comes
    back empty, or takes what is there. Records how many pulls are open at once."""

    def __init__(self) -> None:
        self.waiting: list[int] = []
        self.open_pulls = 0
        self.most_open = 0
        self.arrived = asyncio.Event()
        self.served = 0

    def publish(self, count: int) -> None:
        self.waiting.extend(range(self.served, self.served + count))
        self.arrived.set()

    async def pull(self, subscription: str, count: int, timeout_s: float) -> list[Any]:
        self.open_pulls += 1
        self.most_open = max(self.most_open, self.open_pulls)
        try:
            if not self.waiting:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.arrived.wait(), timeout_s)
            taken, self.waiting = self.waiting[:count], self.waiting[count:]
            if not self.waiting:
                self.arrived.clear()
            self.served += len(taken)
            await asyncio.sleep(0.001)
            return [Received(n) for n in taken]
        finally:
            self.open_pulls -= 1


class CountingPipeline(FakePipeline):
    def __init__(self, expected: int) -> None:
        super().__init__()
        self.expected = expected
        self.all_in = asyncio.Event()

    def submit(self, delivery: Any) -> None:
        super().submit(delivery)
        if len(self.submitted) >= self.expected:
            self.all_in.set()


async def test_an_idle_subscription_keeps_one_pull_open_and_wakes_the_rest() -> None:
    quiet = QuietSubscription()
    pipeline = CountingPipeline(20_050)
    settings = PullSettings(pullers=8, pull_timeout_s=0.05, max_outstanding_messages=100_000)
    source = PullSource(quiet, "s", pipeline, settings)  # type: ignore[arg-type]
    quiet.publish(50)  # traffic first: every puller pulls
    source.start()
    try:
        await asyncio.sleep(0.3)  # the backlog is gone; several long polls came back empty
        quiet.most_open = quiet.open_pulls
        await asyncio.sleep(0.3)
        assert quiet.most_open == 1  # idle: one long poll open at a time
        quiet.publish(20_000)
        await asyncio.wait_for(pipeline.all_in.wait(), 5)
        assert len(pipeline.submitted) == 20_050  # nothing lost or held back
        assert quiet.most_open > 1  # messages came: the siblings pull again
    finally:
        await source.stop_pulling()
