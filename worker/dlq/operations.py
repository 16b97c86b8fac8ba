"""Dead-letter operations: stats, list, export, replay, purge (``utxoiq-worker dlq``).

One object per command line, usable from Python as well (a notebook, a maintenance
task): ``DeadLetters(pubsub, registry)``. Every operation reads a topic's dead-letter
subscription under ``leases.leased``: what it does not acknowledge is released at the
end, unchanged. Replay acknowledges a dead letter only after the publish of its
replacement is confirmed, so a crash midway loses nothing; at worst a message is
replayed twice, which the handlers apply once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncGenerator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from google.protobuf import timestamp_pb2

from worker.dlq.leases import LEASE_S, Leases, leased
from worker.dlq.letters import MAX_REPLAYS, DeadLetter, Selection, replay_attributes
from worker.dlq.replay_file import FileEntry, read_entries
from worker.exceptions import DeadLetterCommandError, WorkerError
from worker.pipeline.crash_points import CrashPoint, CrashPoints
from worker.pipeline.dead_letters import publish_requests
from worker.progress import Progress
from worker.pubsub.client import PubSub, PubsubMessage
from worker.pubsub.names import dead_letter_subscription
from worker.topics import Registry

PUBLISHES_IN_FLIGHT = 4
"""Replay batches published at once (each acknowledged once its publish is confirmed)."""


@dataclass(frozen=True)
class TopicStats:
    topic: str
    by_reason: dict[str, int]
    oldest_age_s: float | None
    newest_age_s: float | None

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())


@dataclass
class ReplaySummary:
    replayed: int = 0
    skipped: int = 0  # over the replay limit
    failed: int = 0  # their publish failed: left in the dead-letter subscription
    errors: list[str] = field(default_factory=list)


class DeadLetters:
    """The dead-letter subscriptions of ``registry``'s topics."""

    def __init__(
        self,
        pubsub: PubSub,
        registry: Registry,
        crash_points: CrashPoints | None = None,
        lease_s: float = LEASE_S,
    ) -> None:
        self.pubsub = pubsub
        self.registry = registry
        self.crash_points = crash_points or CrashPoints.disarmed()
        self.lease_s = lease_s

    def _leased(self, subscription: str) -> AbstractAsyncContextManager[Leases]:
        return leased(self.pubsub, subscription, self.lease_s)

    def _subscription(self, topic: str) -> str:
        self.registry[topic]  # an unknown topic is refused with the known ones named
        return self.pubsub.subscription(dead_letter_subscription(topic))

    async def stats(self, topics: Sequence[str] | None = None) -> list[TopicStats]:
        """Per topic: dead letters by reason, the oldest and newest age. Consumes nothing."""
        now = datetime.now(UTC)
        result = []
        for topic in topics or self.registry.names():
            async with self._leased(self._subscription(topic)) as leases:
                letters = await leases.pull_all()
            ages = [letter.age_s(now) for letter in letters]
            result.append(
                TopicStats(
                    topic,
                    dict(Counter(letter.reason for letter in letters).most_common()),
                    max(ages) if ages else None,
                    min(ages) if ages else None,
                )
            )
        return result

    async def list(
        self, topic: str, selection: Selection = Selection(), limit: int | None = None
    ) -> list[DeadLetter]:
        """The dead letters that match, oldest first (at most ``limit``). Consumes
        nothing: a listed message may meanwhile be redelivered to another reader."""
        async with self._leased(self._subscription(topic)) as leases:
            letters = [letter for letter in await leases.pull_all() if selection.matches(letter)]
        return letters[:limit] if limit is not None else letters

    async def export(self, topic: str, out: TextIO, selection: Selection = Selection()) -> int:
        """Write the matching dead letters to ``out`` as JSON lines; how many. Nothing
        is acknowledged."""
        letters = await self.list(topic, selection)
        for letter in letters:
            out.write(json.dumps(letter.exported(), ensure_ascii=False) + "\n")
        return len(letters)

    async def purge(self, topic: str, selection: Selection = Selection()) -> int | None:
        """Acknowledge the matching dead letters; how many. Without a filter, seek the
        subscription to now (every message gone at once; the count is not known: None)."""
        subscription = self._subscription(topic)
        if selection.everything:
            await self.pubsub.seek(subscription, _timestamp(datetime.now(UTC)))
            return None
        async with self._leased(subscription) as leases:
            chosen = [letter for letter in await leases.pull_all() if selection.matches(letter)]
            await leases.acknowledge(chosen)
        return len(chosen)

    async def replay(
        self,
        topic: str,
        selection: Selection = Selection(),
        *,
        from_file: Path | None = None,
        dry_run: bool = False,
        rate_per_s: float | None = None,
        force: bool = False,
        max_replays: int = MAX_REPLAYS,
        progress: Progress | None = None,
    ) -> ReplaySummary:
        """Publish the matching dead letters (or a file's edited messages) to ``topic``
        and acknowledge each dead letter once its replacement's publish is confirmed.

        Dead letters chosen by reason or not at all go out as they are pulled, while
        the next pulls run; ``--message-id`` and file replays first read the whole
        subscription, since an id that names no dead letter refuses everything."""
        subscription = self._subscription(topic)
        entries = read_entries(from_file) if from_file is not None else None
        summary = ReplaySummary()
        limit = None if force else max_replays
        async with self._leased(subscription) as leases:
            if entries is None and selection.message_ids is None:
                work = _streamed(leases, selection)
            else:
                work = _checked(leases, selection, entries)
            async with contextlib.aclosing(work):
                if dry_run:
                    async for piece in work:
                        summary.replayed += len(_within_limit(piece, limit, summary))
                    return summary
                await self._publish_then_ack(
                    topic, work, limit, leases, rate_per_s, summary, progress
                )
        return summary

    async def _publish_then_ack(
        self,
        topic: str,
        work: AsyncGenerator[Sequence[Work], None],
        limit: int | None,
        leases: Leases,
        rate_per_s: float | None,
        summary: ReplaySummary,
        progress: Progress | None,
    ) -> None:
        """Publish ``work`` in batches, ``PUBLISHES_IN_FLIGHT`` at once (one at a time
        when paced), acknowledging each batch's dead letters once its publish is
        confirmed; a batch whose publish failed stays in the subscription. While every
        slot is busy ``work`` is not read, so its pulls wait too."""
        pacer = _Pacer(rate_per_s)
        in_flight = asyncio.Semaphore(PUBLISHES_IN_FLIGHT if rate_per_s is None else 1)
        target = self.pubsub.topic(topic)

        async def publish_then_ack(batch: Sequence[Work]) -> None:
            try:
                now = datetime.now(UTC)
                messages = [
                    PubsubMessage(
                        data=data, attributes=replay_attributes(attrs, letter.replay_count, now)
                    )
                    for letter, data, attrs in batch
                ]
                try:
                    for request in publish_requests(messages):
                        await self.pubsub.publish(target, request)
                except WorkerError as error:
                    summary.failed += len(batch)
                    summary.errors.append(str(error))
                    return
                self.crash_points.reach(CrashPoint.REPLAY_AFTER_PUBLISH)
                await leases.acknowledge([letter for letter, _, _ in batch])
                summary.replayed += len(batch)
                if progress is not None:
                    progress.advance(len(batch))
            finally:
                in_flight.release()

        sent: list[asyncio.Task[None]] = []

        async def send(batch: Sequence[Work]) -> None:
            await pacer.wait(len(batch))
            await in_flight.acquire()
            sent.append(asyncio.create_task(publish_then_ack(batch)))

        buffered: list[Work] = []
        async for piece in work:
            buffered.extend(_within_limit(piece, limit, summary))
            while len(buffered) >= pacer.batch_size:
                await send(buffered[: pacer.batch_size])
                del buffered[: pacer.batch_size]
        if buffered:
            await send(buffered)
        await asyncio.gather(*sent)


Work = tuple[DeadLetter, bytes, dict[str, str]]


def _as_held(letters: Iterable[DeadLetter]) -> list[Work]:
    return [(letter, letter.data, letter.attributes) for letter in letters]


async def _streamed(leases: Leases, selection: Selection) -> AsyncGenerator[Sequence[Work], None]:
    """The matching dead letters of each pull, as it comes (in no particular order:
    the handlers do not depend on one)."""
    async with contextlib.aclosing(leases.pulled()) as pulled:
        async for letters in pulled:
            yield _as_held(letter for letter in letters if selection.matches(letter))


async def _checked(
    leases: Leases, selection: Selection, entries: Sequence[FileEntry] | None
) -> AsyncGenerator[Sequence[Work], None]:
    """Every matching dead letter (or the file's entries) at once, oldest first, once
    each id given was found in the whole subscription."""
    held = [letter for letter in await leases.pull_all() if selection.matches(letter)]
    _refuse_unknown_ids(selection, held)
    yield _from_file(held, entries) if entries is not None else _as_held(held)


def _within_limit(work: Sequence[Work], limit: int | None, summary: ReplaySummary) -> list[Work]:
    """``work`` without the dead letters replayed ``limit`` times already (counted as
    skipped: ``--force`` replays them)."""
    due = [item for item in work if limit is None or item[0].replay_count < limit]
    summary.skipped += len(work) - len(due)
    return due


def _refuse_unknown_ids(selection: Selection, held: Sequence[DeadLetter]) -> None:
    """``--message-id``: every id given must name a dead letter held (its own id or its
    source message's), or nothing is replayed."""
    if selection.message_ids is None:
        return
    known = {i for letter in held for i in (letter.message_id, letter.source_message_id)}
    unknown = sorted(selection.message_ids - known)
    if unknown:
        raise DeadLetterCommandError(
            f"no dead letter has the id {', '.join(unknown)}; nothing replayed"
        )


def _from_file(held: Sequence[DeadLetter], entries: Sequence[FileEntry]) -> list[Work]:
    """Each file entry with the dead letter it replaces (same source message id); an
    entry without one refuses the whole replay before anything is published."""
    by_source = {letter.source_message_id: letter for letter in held}
    unknown = [e.source_message_id for e in entries if e.source_message_id not in by_source]
    if unknown:
        shown = ", ".join(unknown[:5]) + (
            f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        )
        raise DeadLetterCommandError(
            f"{len(unknown)} message(s) of the file match no dead letter by source message"
            f" id (replayed or purged already, or another topic's): {shown}; nothing replayed"
        )
    return [(by_source[e.source_message_id], e.data, e.attributes) for e in entries]


def _timestamp(moment: datetime) -> Any:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


class _Pacer:
    """At most ``rate_per_s`` messages a second, in batches of at most a tenth of it."""

    def __init__(self, rate_per_s: float | None) -> None:
        self.rate_per_s = rate_per_s
        self.batch_size = 1000 if rate_per_s is None else max(1, min(1000, int(rate_per_s / 10)))
        self._started = time.monotonic()
        self._sent = 0

    async def wait(self, count: int) -> None:
        if self.rate_per_s is not None:
            due = self._started + self._sent / self.rate_per_s
            if (delay := due - time.monotonic()) > 0:
                await asyncio.sleep(delay)
        self._sent += count
