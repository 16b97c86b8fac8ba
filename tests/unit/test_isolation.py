"""One bad message never costs its neighbours (issue 14): an unexpected exception
while validating, applying or pulling nacks the message it belongs to, alone; the
loops that died of one start again and release what they held.

The pipeline and the pull source are the real ones; the handler and Pub/Sub are
fakes that fail on purpose.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from tests.support.fakes import Fussy, PipelineRun, counter, payloads
from tests.unit.test_leases import FakePipeline, Received
from worker.sources.pull import PullSource
from worker.sources.settings import PullSettings


async def test_unexpected_errors_nack_their_message_alone() -> None:
    run = PipelineRun(Fussy())
    messages = payloads(*(f"ok-{i}" for i in range(20)), "apply-boom")
    messages["parse-boom"] = b'{"parse": "boom"}'
    messages["refused"] = b'{"parse": "refuse"}'
    await run.settle(messages)

    assert sorted(run.settled.nacked) == ["apply-boom", "parse-boom"]
    assert sorted(run.settled.acked) == sorted([*(f"ok-{i}" for i in range(20)), "refused"])
    assert sorted(run.handler.applied) == sorted(f"ok-{i}".encode() for i in range(20))
    assert run.dead.published == [("refused", "schema_violation")]
    assert counter(run.reader, "worker.unexpected_errors", "stage") == {"validate": 1, "apply": 1}


class FlakyPipeline(FakePipeline):
    """Its ``submit`` raises once, on the second message it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.errors: list[str] = []

    def submit(self, delivery: Any) -> None:
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("a bug in the intake")
        super().submit(delivery)

    def count_unexpected(self, stage: str) -> None:
        self.errors.append(stage)


class Backlog:
    """Three messages a pull, for ever; records acks and nacks."""

    def __init__(self) -> None:
        self.served = 0
        self.nacked: list[str] = []

    def subscription(self, name: str) -> str:
        return name

    async def pull(self, subscription: str, count: int, timeout_s: float) -> list[Received]:
        await asyncio.sleep(0.01)
        first, self.served = self.served, self.served + 3
        return [Received(n) for n in range(first, self.served)]

    async def modify_ack_deadline(self, subscription: str, ack_ids: Sequence[str], s: int) -> None:
        if s == 0:
            self.nacked.extend(ack_ids)

    async def acknowledge(self, subscription: str, ack_ids: Sequence[str]) -> None:
        return None


async def test_a_pull_loop_that_raises_releases_its_messages_and_goes_on() -> None:
    backlog, pipeline = Backlog(), FlakyPipeline()
    settings = PullSettings(pullers=1, max_outstanding_messages=100, settle_every_ms=5)
    source = PullSource(backlog, "sub", pipeline, settings)  # type: ignore[arg-type]
    source.start()
    try:
        for _ in range(300):
            if len(pipeline.submitted) >= 10:
                break
            await asyncio.sleep(0.01)
    finally:
        await source.stop_pulling()
        await source.close()
    # The failing message and the one after it in its pull went back to Pub/Sub at
    # once; the loop restarted and went on pulling.
    assert backlog.nacked[:2] == ["ack-1", "ack-2"]
    assert len(pipeline.submitted) >= 10
    assert pipeline.errors == ["pull"]
