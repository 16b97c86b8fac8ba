"""The pull source: unary Pull calls, bounded by flow control, settled in bulk.

Why unary Pull rather than StreamingPull (measured on this machine, see README):
the emulator serves StreamingPull at about 100 messages per 50 ms per stream, while
a loop of unary ``Pull(max_messages=1000)`` calls drains it many times faster. On
the real service unary Pull is a supported, long-polling API; several concurrent
pulls per subscription keep a request always waiting, so latency stays low.

- flow control: at most ``max_outstanding_messages`` and ``max_outstanding_bytes``
  received but not yet settled; pulls wait for room (memory stays bounded);
- leases: every unsettled message is extended to ``ack_deadline_s`` before its lease
  can run out: a new message's lease is taken to be Pub/Sub's minimum (10 s), which
  no subscription is below, so whatever a subscription's deadline a held message
  (a batch waiting out an outage, say) never returns to Pub/Sub while we hold it;
- one pull at a time until a pull brings messages: at start (the first pull, of a
  few messages, tells the message size, see ``_hold``) and whenever a pull came back
  empty (an idle subscription needs one open long poll, not one per puller: each
  costs the emulator about 0.3% of a core, and the worker runs four subscriptions);
- settlement: acks and nacks are gathered and sent in bulk requests;
- stop: pulling stops first, then the runtime drains the pipeline, then ``close``
  sends the last acks and nacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, cast

from worker.exceptions import WorkerError
from worker.pipeline.batching import TopicPipeline
from worker.pipeline.delivery import Delivery
from worker.pipeline.supervision import keep_running
from worker.pubsub.client import PubSub
from worker.sources.settings import PullSettings

log = logging.getLogger(__name__)

MAX_PULL_MESSAGES = 1000
FIRST_PULL_MESSAGES = 100
"""Asked for while no message size is known yet (bounds the first pull's bytes)."""


YIELD_EVERY_S = 0.005
"""Longest run of validation before the pull loop lets other tasks go."""


MIN_ACK_DEADLINE_S = 10
"""Pub/Sub's smallest ack deadline: a fresh message's lease lasts at least this."""


class _PublishTimes:
    """Publish timestamps as datetimes, converted once per distinct stamp: the messages
    of one publish request share theirs, and a pull brings runs of them."""

    def __init__(self) -> None:
        self._stamp: tuple[int, int] = (-1, -1)
        self._moment = datetime.min.replace(tzinfo=UTC)

    def __call__(self, message: Any) -> datetime:
        stamp = message.publish_time
        seconds_nanos = (stamp.seconds, stamp.nanos)
        if seconds_nanos != self._stamp:
            self._stamp = seconds_nanos
            self._moment = datetime.fromtimestamp(stamp.seconds + stamp.nanos / 1e9, UTC)
        return self._moment


def _attributes(message: Any) -> dict[str, str]:
    attributes = message.attributes
    return dict(attributes) if attributes else {}  # most messages have none: skip the copy


class PullSource:
    def __init__(
        self,
        pubsub: PubSub,
        subscription: str,
        pipeline: TopicPipeline,
        settings: PullSettings = PullSettings(),
    ) -> None:
        self.pubsub = pubsub
        self.subscription = pubsub.subscription(subscription)
        self.pipeline = pipeline
        self.settings = settings
        # ack_id -> (monotonic time its lease runs out, bytes)
        self._outstanding: dict[str, tuple[float, int]] = {}
        self._outstanding_bytes = 0
        # Messages asked for by pulls in flight: concurrent pullers must not each
        # claim the same room, or flow control would allow pullers x the limit.
        self._requested = 0
        # Pull has no byte limit: a pull of 1000 messages of 100 KB brings 100 MB. Pulls
        # ask for as many messages as the bytes left hold at the average size so far.
        self._average_size = 0.0
        self._room = asyncio.Event()
        self._room.set()
        # Set by a pull that brought messages, cleared by one that came back empty;
        # while it is clear, one pull at a time (none has brought a message size yet,
        # or the subscription is idle).
        self._traffic = asyncio.Event()
        self._acks: list[str] = []
        self._first_ack_at = 0.0  # when the oldest ack waiting to be sent was called
        self._nacks: list[str] = []
        self._settle_now = asyncio.Event()
        self._pulling: list[asyncio.Task[None]] = []
        self._background: list[asyncio.Task[None]] = []
        self._stopping = False

    # -- Settler -----------------------------------------------------------------------

    def ack(self, delivery: Delivery) -> None:
        ack_id = self._release(delivery)
        if not self._acks:
            self._first_ack_at = time.monotonic()
        self._acks.append(ack_id)
        if len(self._acks) >= MAX_PULL_MESSAGES:
            self._settle_now.set()

    def nack(self, delivery: Delivery) -> None:
        self._nacks.append(self._release(delivery))
        self._settle_now.set()

    def _release(self, delivery: Delivery) -> str:
        """Stop holding ``delivery``; its ack id (the token this source gave it)."""
        ack_id = cast(str, delivery.token)
        held = self._outstanding.pop(ack_id, None)
        if held is not None:
            self._outstanding_bytes -= held[1]
        if not self._room.is_set() and self._has_room():
            self._room.set()
        return ack_id

    def _messages_to_ask(self) -> int:
        """What the next pull may ask for: within the message limit, and within the
        byte limit at the average message size (concurrent pulls included)."""
        room = self.settings.max_outstanding_messages - len(self._outstanding) - self._requested
        if self._average_size == 0:
            return max(1, min(FIRST_PULL_MESSAGES, room))
        bytes_left = self.settings.max_outstanding_bytes - self._expected_bytes()
        return max(1, min(MAX_PULL_MESSAGES, room, int(bytes_left / self._average_size)))

    def _has_room(self) -> bool:
        if len(self._outstanding) + self._requested >= self.settings.max_outstanding_messages:
            return False
        return self._expected_bytes() < self.settings.max_outstanding_bytes

    def _expected_bytes(self) -> float:
        """Bytes held, plus what the pulls in flight will bring at the average size."""
        return self._outstanding_bytes + self._requested * self._average_size

    def _hold(self, deliveries: list[Delivery]) -> None:
        """Count a pull's messages as outstanding, all of them before any is submitted:
        submitting yields to the loop, and a sibling puller must not see their room
        as free meanwhile. Also learns the average message size."""
        leased_until = time.monotonic() + MIN_ACK_DEADLINE_S
        pulled_bytes = 0
        for delivery in deliveries:
            size = len(delivery.data)  # flow control bounds payload bytes
            self._outstanding[cast(str, delivery.token)] = (leased_until, size)
            pulled_bytes += size
        self._outstanding_bytes += pulled_bytes
        average = max(1.0, pulled_bytes / len(deliveries))
        if self._average_size == 0:
            self._average_size = average
        else:
            # Weighted by how many came: a pull of 1000 outweighs a pull of one.
            weight = max(0.1, min(1.0, len(deliveries) / MAX_PULL_MESSAGES))
            self._average_size += (average - self._average_size) * weight

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._pulling = [
            self._supervised("pull", self._pull_loop) for _ in range(self.settings.pullers)
        ]
        self._background = [
            self._supervised("settle", self._settle_loop),
            self._supervised("lease", self._lease_loop),
        ]

    def _supervised(self, stage: str, loop: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """A task running ``loop``, restarted whenever it raises unexpectedly."""
        name = f"{stage}-{self.subscription}"
        return asyncio.create_task(
            keep_running(name, loop, lambda _: self.pipeline.count_unexpected(stage)), name=name
        )

    async def stop_pulling(self) -> None:
        """Let the pulls in flight return (their messages are kept), start no more."""
        self._stopping = True
        self._room.set()
        self._traffic.set()
        _done, pending = (
            await asyncio.wait(self._pulling, timeout=self.settings.pull_timeout_s + 0.5)
            if self._pulling
            else (set(), set())
        )
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def close(self) -> None:
        """Nack whatever is still unsettled, send the last acks and nacks, stop."""
        leftovers = list(self._outstanding)
        self._nacks.extend(leftovers)
        self._outstanding.clear()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._settle()

    @property
    def running(self) -> bool:
        """Every loop of this source is still going (a supervised loop that failed was
        restarted; one that ended did so for good)."""
        tasks = [*self._pulling, *self._background]
        return bool(tasks) and not any(task.done() for task in tasks)

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)

    # -- loops -------------------------------------------------------------------------

    async def _pull_loop(self) -> None:
        while not self._stopping:
            await self.pipeline.backoff.wait()
            if not self._has_room():
                self._room.clear()
                await self._room.wait()
                continue
            if not self._traffic.is_set() and self._requested:
                await self._traffic.wait()  # a sibling's pull is out (every pull asks >= 1)
                continue
            if self._stopping:
                break
            asked = self._messages_to_ask()
            self._requested += asked
            try:
                received = await self.pubsub.pull(
                    self.subscription, asked, self.settings.pull_timeout_s
                )
            except WorkerError as error:
                log.warning(
                    "pull failed", extra={"subscription": self.subscription, "error": str(error)}
                )
                self.pipeline.backoff.failed()
                continue
            finally:
                self._requested -= asked
                if self._has_room():
                    self._room.set()
            if not received:
                self._traffic.clear()
                continue
            self._traffic.set()
            deliveries = self._deliveries(received)
            self._hold(deliveries)
            await self._submit(deliveries)

    async def _submit(self, deliveries: list[Delivery]) -> None:
        """Hand a pull's messages to the pipeline, letting other tasks run meanwhile.

        Whatever interrupts this (a bug, a cancellation at stop) releases the messages
        not yet handed over: nacked, they go back to Pub/Sub at once.
        """
        submitted = 0
        try:
            slice_ends = time.perf_counter() + YIELD_EVERY_S
            for delivery in deliveries:
                self.pipeline.submit(delivery)
                submitted += 1
                if time.perf_counter() >= slice_ends:
                    # A pull may bring 100 messages of 1000 samples: validating them
                    # all in one go would starve the flushes, whose next statement
                    # or COPY chunk waits for the loop while PostgreSQL sits idle.
                    await asyncio.sleep(0)
                    slice_ends = time.perf_counter() + YIELD_EVERY_S
        except BaseException:
            for delivery in deliveries[submitted:]:
                delivery.nack()
            raise

    def _deliveries(self, received: list[Any]) -> list[Delivery]:
        """A pull's messages as deliveries, each protobuf field read once."""
        publish_time = _PublishTimes()
        received_at = time.monotonic()
        deliveries = []
        for received_message in received:
            message = received_message.message
            deliveries.append(
                Delivery(
                    data=message.data,
                    attributes=_attributes(message),
                    message_id=message.message_id,
                    publish_time=publish_time(message),
                    subscription=self.subscription,
                    settler=self,
                    token=received_message.ack_id,
                    delivery_attempt=received_message.delivery_attempt or None,
                    received_at=received_at,
                )
            )
        return deliveries

    async def _settle_loop(self) -> None:
        interval_s = self.settings.settle_every_ms / 1000
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settle_now.wait(), interval_s)
            self._settle_now.clear()
            await self._settle()

    async def _settle(self) -> None:
        acks, self._acks = self._acks, []
        first_ack_at = self._first_ack_at
        nacks, self._nacks = self._nacks, []
        # An ack that is lost only means a redelivery, and every write is idempotent;
        # still, try twice before leaving it to Pub/Sub.
        for attempt in (1, 2):
            try:
                if acks:
                    await self.pubsub.acknowledge(self.subscription, acks)
                    self.pipeline.record_stage("ack", time.monotonic() - first_ack_at)
                    acks = []
                if nacks:
                    await self.pubsub.modify_ack_deadline(self.subscription, nacks, 0)
                    nacks = []
                return
            except WorkerError as error:
                log.warning("settlement failed", extra={"attempt": attempt, "error": str(error)})

    async def _lease_loop(self) -> None:
        every_s = self.settings.lease_check_every_s
        extend_s = self.settings.ack_deadline_s
        while True:
            await asyncio.sleep(every_s)
            now = time.monotonic()
            cutoff = now + self.settings.lease_margin_s
            due = [ack_id for ack_id, (until, _) in self._outstanding.items() if until <= cutoff]
            if not due:
                continue
            try:
                await self.pubsub.modify_ack_deadline(self.subscription, due, extend_s)
                for ack_id in due:
                    held = self._outstanding.get(ack_id)
                    if held is not None:  # not settled meanwhile
                        self._outstanding[ack_id] = (now + extend_s, held[1])
            except WorkerError as error:
                log.warning("lease extension failed", extra={"error": str(error)})
