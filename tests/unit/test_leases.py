"""The pull source keeps the lease of every message it holds, whatever the
subscription's ack deadline (Pub/Sub's minimum is 10 s)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from worker.sources.pull import MIN_ACK_DEADLINE_S, PullSource
from worker.sources.settings import PullSettings


class FakePipeline:
    def __init__(self) -> None:
        self.submitted: list[Any] = []

        class _NoBackoff:
            async def wait(self) -> None:
                return None

            def failed(self) -> None:
                return None

        self.backoff = _NoBackoff()

    def submit(self, delivery: Any) -> None:
        self.submitted.append(delivery)


class _Stamp:
    seconds, nanos = 1_700_000_000, 0


class _Message:
    def __init__(self, n: int, data: bytes = b"{}") -> None:
        self.data = data
        self.attributes: dict[str, str] = {}
        self.message_id = str(n)
        self.publish_time = _Stamp()


class Received:
    """A received message as the Pull response holds it."""

    def __init__(self, n: int, data: bytes = b"{}") -> None:
        self.ack_id = f"ack-{n}"
        self.message = _Message(n, data)
        self.delivery_attempt = 1


class FakePubSub:
    """Hands out two messages once, records lease extensions."""

    def __init__(self) -> None:
        self.extended: list[tuple[list[str], int]] = []
        self.handed_out = False

    def subscription(self, name: str) -> str:
        return name

    async def pull(self, subscription: str, count: int, timeout_s: float) -> list[Received]:
        if self.handed_out:
            await asyncio.sleep(timeout_s)
            return []
        self.handed_out = True
        return [Received(1), Received(2)]

    async def modify_ack_deadline(
        self, subscription: str, ack_ids: Sequence[str], deadline_s: int
    ) -> None:
        self.extended.append((list(ack_ids), deadline_s))

    async def acknowledge(self, subscription: str, ack_ids: Sequence[str]) -> None:
        return None


async def test_a_held_message_is_extended_before_the_shortest_deadline_runs_out() -> None:
    pubsub = FakePubSub()
    pipeline = FakePipeline()
    # A margin wider than Pub/Sub's minimum deadline: "due" on the first check, so the
    # test needs no 5 s wait to see the rule at work.
    settings = PullSettings(
        pullers=1,
        pull_timeout_s=0.05,
        lease_check_every_s=0.05,
        lease_margin_s=MIN_ACK_DEADLINE_S + 1,
        ack_deadline_s=60,
    )
    source = PullSource(pubsub, "sub", pipeline, settings)  # type: ignore[arg-type]
    source.start()
    try:
        for _ in range(100):
            if pubsub.extended:
                break
            await asyncio.sleep(0.02)
        assert pubsub.extended, "the held messages were never extended"
        ack_ids, deadline_s = pubsub.extended[0]
        assert sorted(ack_ids) == ["ack-1", "ack-2"] and deadline_s == 60
        # Once extended they are good for 60 s: not extended again at every check.
        count = len(pubsub.extended)
        await asyncio.sleep(0.3)
        assert len(pubsub.extended) == count
        # Settled messages are not extended any more.
        for delivery in pipeline.submitted:
            source.ack(delivery)
        assert source.outstanding == 0
    finally:
        await source.stop_pulling()
        await source.close()
