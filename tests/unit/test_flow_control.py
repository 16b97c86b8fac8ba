"""Flow control by bytes: Pub/Sub's pull has no byte limit, so the pull source sizes
each pull from the average message size, and never holds much more than
``max_outstanding_bytes`` however large the messages."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.unit.test_leases import FakePipeline
from worker.pull import FIRST_PULL_MESSAGES, PullSettings, PullSource

MESSAGE_BYTES = 100_000


class _Message:
    def __init__(self, n: int) -> None:
        self.data = b"x" * MESSAGE_BYTES
        self.attributes: dict[str, str] = {}
        self.message_id = str(n)

        class _Stamp:
            seconds, nanos = 1_700_000_000, 0

        self.publish_time = _Stamp()


class _Received:
    def __init__(self, n: int) -> None:
        self.ack_id = f"ack-{n}"
        self.message = _Message(n)
        self.delivery_attempt = 1


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
        return [_Received(n) for n in range(first, self.served)]

    async def modify_ack_deadline(self, *args: Any) -> None:
        return None

    async def acknowledge(self, *args: Any) -> None:
        return None


async def test_large_messages_are_pulled_within_the_byte_limit() -> None:
    backlog = EndlessBacklog()
    limit_bytes = 2_000_000  # 20 messages of 100 KB
    settings = PullSettings(pullers=8, max_outstanding_bytes=limit_bytes)
    source = PullSource(backlog, "s", FakePipeline(), settings)  # type: ignore[arg-type]
    source.start()
    try:
        await asyncio.sleep(0.2)  # nothing is ever settled: the pipeline holds all
    finally:
        await source.stop_pulling()
    # Until a size is known, one pull at a time, of a few messages; then pulls sized
    # to the bytes left, however many pullers there are.
    assert backlog.asked[0] == FIRST_PULL_MESSAGES
    held_bytes = backlog.served * MESSAGE_BYTES
    assert held_bytes <= FIRST_PULL_MESSAGES * MESSAGE_BYTES
    assert backlog.asked[1:] == []  # the first pull alone already went over the limit


async def test_pulls_are_sized_to_the_bytes_left() -> None:
    backlog = EndlessBacklog()
    limit_bytes = 30_000_000  # 300 messages of 100 KB
    settings = PullSettings(pullers=8, max_outstanding_bytes=limit_bytes)
    source = PullSource(backlog, "s", FakePipeline(), settings)  # type: ignore[arg-type]
    source.start()
    try:
        await asyncio.sleep(0.2)
    finally:
        await source.stop_pulling()
    assert backlog.asked[0] == FIRST_PULL_MESSAGES
    # 8 pullers asking 1000 each would hold 800 MB; the limit holds within one message.
    assert backlog.served * MESSAGE_BYTES <= limit_bytes + MESSAGE_BYTES
    assert backlog.served >= 290
