"""Every message of a dead-letter subscription, pulled and held for one command.

Pub/Sub has no way to read a subscription without leasing what it reads. To see each
message once, a command keeps the leases of everything it pulled (extending them while
it works, so none comes back to it), and at the end releases what it did not
acknowledge, all at once (ack deadline 0): those are at once deliverable again, to
any reader. Meanwhile another reader of the subscription does not get them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence

from worker.dlq.letters import DeadLetter
from worker.pubsub.client import PubSub

log = logging.getLogger(__name__)

PULL_MESSAGES = 1000
PULL_TIMEOUT_S = 1.0
# Pulls at once: the emulator returns at most 100 messages a pull, so the drain is
# round trips; several in flight cut it (README, replay benchmark). A subscription is
# taken as drained once every puller's last pull came back empty.
PULLERS = 8
PULLED_AHEAD = 2 * PULLERS
LEASE_S = 60.0
"""How long a command's hold lasts between extensions (``DLQ_LEASE``): what a crashed
command held comes back this long after it died."""


class Leases:
    """The dead letters one command holds; see the module's docstring."""

    def __init__(self, pubsub: PubSub, subscription: str, lease_s: float = LEASE_S) -> None:
        self.pubsub = pubsub
        self.subscription = subscription
        self.lease_s = lease_s
        self._held: dict[str, DeadLetter] = {}  # by message id

    @property
    def held(self) -> list[DeadLetter]:
        """Held dead letters, oldest first."""
        return sorted(self._held.values(), key=lambda letter: letter.publish_time)

    async def pull_all(self) -> list[DeadLetter]:
        """Pull until the subscription is drained; every dead letter held, oldest
        first, each on this command's lease (not the subscription's ack deadline)."""
        async with contextlib.aclosing(self.pulled()) as batches:
            async for _ in batches:
                pass
        return self.held

    async def pulled(self) -> AsyncGenerator[list[DeadLetter], None]:
        """Each pull's dead letters as they come, until the subscription is drained;
        every one held until acknowledged or released. Pulls stay at most
        ``PULLED_AHEAD`` batches ahead of the caller: a slow caller (a paced replay)
        leaves the rest in the subscription rather than in memory, unleased."""
        batches: asyncio.Queue[list[DeadLetter] | None] = asyncio.Queue(PULLED_AHEAD)

        async def puller() -> None:
            while received := await self.pubsub.pull(
                self.subscription, PULL_MESSAGES, PULL_TIMEOUT_S
            ):
                letters = [DeadLetter.from_received(message) for message in received]
                for letter in letters:
                    # A redelivery (a lease lost meanwhile) replaces the stale ack id.
                    self._held[letter.message_id] = letter
                # On this command's lease from the start: a crash right after this pull
                # gives them back ``lease_s`` later, not the subscription's deadline.
                await self._renew(letters)
                await batches.put(letters)

        async def drain() -> None:
            pullers = [asyncio.create_task(puller()) for _ in range(PULLERS)]
            try:
                await asyncio.gather(*pullers)  # the first failure as it was raised
            finally:
                for task in pullers:
                    task.cancel()
                await asyncio.gather(*pullers, return_exceptions=True)
                await batches.put(None)

        draining = asyncio.create_task(drain())
        try:
            while (batch := await batches.get()) is not None:
                yield batch
            await draining  # a puller's failure
        finally:
            draining.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await draining

    async def acknowledge(self, letters: Sequence[DeadLetter]) -> None:
        """Acknowledge ``letters`` (gone from the subscription), no longer held."""
        await self.pubsub.acknowledge(self.subscription, [letter.ack_id for letter in letters])
        for letter in letters:
            self._held.pop(letter.message_id, None)

    @property
    def deadline_s(self) -> int:
        return max(10, round(self.lease_s))  # Pub/Sub's shortest ack deadline is 10 s

    async def extend(self) -> None:
        """Every held lease renewed for ``lease_s`` from now."""
        await self._renew(self._held.values())

    async def _renew(self, letters: Iterable[DeadLetter]) -> None:
        ack_ids = [letter.ack_id for letter in letters]
        await asyncio.gather(
            *(
                self.pubsub.modify_ack_deadline(
                    self.subscription, ack_ids[at : at + PULL_MESSAGES], self.deadline_s
                )
                for at in range(0, len(ack_ids), PULL_MESSAGES)
            )
        )

    async def release(self) -> None:
        """Make every held dead letter deliverable again at once."""
        held, self._held = list(self._held.values()), {}
        if held:
            await self.pubsub.modify_ack_deadline(
                self.subscription, [letter.ack_id for letter in held], 0
            )


@contextlib.asynccontextmanager
async def leased(
    pubsub: PubSub, subscription: str, lease_s: float = LEASE_S
) -> AsyncIterator[Leases]:
    """Leases kept alive while the block runs, and released when it ends (whatever ends
    it; a crash of the process instead lets them lapse after ``lease_s``)."""
    leases = Leases(pubsub, subscription, lease_s)

    async def keep_alive() -> None:
        while True:
            await asyncio.sleep(leases.deadline_s / 3)
            try:
                await leases.extend()
            except Exception as error:  # the next round tries again; the command goes on
                log.warning("dead-letter leases not extended", extra={"error": str(error)})

    keeper = asyncio.create_task(keep_alive())
    try:
        yield leases
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        await leases.release()
