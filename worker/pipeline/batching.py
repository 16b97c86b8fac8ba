"""One topic's path from delivery to settlement.

source -> decode/validate -> batch -> handler (one transaction) -> commit ->
after-commit hook (cache invalidations) -> dead letters -> ack.

A batch is flushed when it holds ``max_batch_size`` deliveries or ``max_batch_bytes``
of message data (a metrics message may carry 1000 samples), when its oldest
delivery has waited ``max_batch_delay_ms``, or at once when no batch of the topic is
committing (group commit: under load batches gather behind the one committing, and a
lone message never waits for the delay; a batch publishing its invalidations no
longer holds the database, so the next one need not wait for it). Up to
``max_concurrent_flushes`` batches of a topic are in flight at once, so Python
decodes the next batch while PostgreSQL commits the last. A delivery is acked only
after its batch committed (or after it was dead-lettered); a transient failure nacks
it and pauses the sources briefly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from worker.exceptions import PermanentError, WorkerError
from worker.pipeline.crash_points import CrashPoint, CrashPoints
from worker.pipeline.dead_letters import DeadLetterPublisher
from worker.pipeline.decoding import decode_json_object
from worker.pipeline.delivery import Delivery
from worker.pipeline.handler import BatchOutcome, Handler
from worker.pipeline.settings import BatchSettings
from worker.pipeline.supervision import keep_running
from worker.pipeline.trace_links import links_to_publishers
from worker.telemetry import STAGES, Telemetry

log = logging.getLogger(__name__)

AfterCommit = Callable[[str, frozenset[str]], Awaitable[None]]


@dataclass(slots=True)
class _Entry:
    delivery: Delivery
    item: Any = None
    error: PermanentError | None = None
    validated_at: float = 0.0


class Backoff:
    """A pipeline's pause after transient failures: its source stops hammering a dead database.

    Batches in flight fail together when the database goes: the pause doubles at most
    once per pause (ten failures at once are one failure, not a 2**10 pause), and the
    first success ends it.
    """

    def __init__(self, initial_s: float = 0.25, maximum_s: float = 10.0) -> None:
        self.initial_s = initial_s
        self.maximum_s = maximum_s
        self._delay_s = 0.0
        self._until = 0.0
        self._resumed = asyncio.Event()

    def failed(self) -> None:
        now = time.monotonic()
        if now < self._until:
            return  # already pausing for this outage
        self._delay_s = min(self.maximum_s, max(self.initial_s, self._delay_s * 2))
        self._until = now + self._delay_s
        self._resumed.clear()

    def succeeded(self) -> None:
        self._delay_s = 0.0
        self._until = 0.0
        self._resumed.set()

    async def wait(self) -> None:
        remaining = self._until - time.monotonic()
        if remaining > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._resumed.wait(), remaining)


class TopicPipeline:
    def __init__(
        self,
        handler: Handler[Any],
        engine: AsyncEngine,
        dead_letters: DeadLetterPublisher,
        telemetry: Telemetry,
        settings: BatchSettings = BatchSettings(),
        after_commit: AfterCommit | None = None,
        backoff: Backoff | None = None,
        crash_points: CrashPoints | None = None,
    ) -> None:
        self.topic = handler.topic
        self.handler = handler
        self.engine = engine
        # Tests only (WORKER_CRASH_AT): disarmed, ``guard_commits`` is ``engine`` itself.
        self.crash_points = crash_points or CrashPoints.disarmed()
        self._handler_engine = self.crash_points.guard_commits(engine)
        self.dead_letters = dead_letters
        self.telemetry = telemetry
        self.settings = settings
        self.after_commit = after_commit
        self.backoff = backoff or Backoff()
        self._attributes = {"topic": self.topic}
        self._stages = {stage: {"topic": self.topic, "stage": stage} for stage in STAGES}
        self._pending: list[_Entry] = []
        self._pending_bytes = 0
        self._oldest_at = 0.0
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(settings.max_concurrent_flushes)
        self._flushes: set[asyncio.Task[None]] = set()
        self._committing = 0  # batches inside the handler's transaction
        self._closing = False

    # -- intake ----------------------------------------------------------------------

    def submit(self, delivery: Delivery) -> None:
        """Decode and validate now; the delivery is settled later by a flush.

        Never raises: a message whose validation fails unexpectedly (a bug, or an
        input nobody foresaw) is nacked at once, alone, so Pub/Sub redelivers it and
        dead-letters it after its attempts; its neighbours go on as usual.
        """
        entry = _Entry(delivery, error=delivery.error)
        if entry.error is None:
            try:
                payload = decode_json_object(delivery.data)
                entry.item = self.handler.parse(payload, delivery.publish_time)
            except PermanentError as error:
                entry.error = error
            except Exception:
                self._unexpected("validate", [delivery])
                return
        entry.validated_at = time.monotonic()
        if not self._pending:
            self._oldest_at = time.monotonic()
            self._wakeup.set()  # a batch has started: its delay clock runs
        self._pending.append(entry)
        self._pending_bytes += len(delivery.data)
        if self._full():
            self._wakeup.set()

    def _full(self) -> bool:
        return (
            len(self._pending) >= self.settings.max_batch_size
            or self._pending_bytes >= self.settings.max_batch_bytes
        )

    # -- flushing --------------------------------------------------------------------

    async def run(self) -> None:
        """Flush batches until cancelled."""
        await keep_running(f"flush-{self.topic}", self._flush_loop, self.count_unexpected)

    def record_stage(self, stage: str, seconds: float) -> None:
        """Time spent in ``stage`` (``worker.telemetry.STAGES``) by the slowest message
        of a batch, or of a source's bulk request."""
        self.telemetry.stage_ms.record(seconds * 1000, self._stages[stage])

    def _record_waits(self, batch: list[_Entry], flushed_at: float) -> None:
        """The batch's delivery, validation and batching stages, each for the message
        that spent the longest in it (one loop, no OpenTelemetry call per message)."""
        oldest = min(batch, key=lambda e: e.delivery.publish_time).delivery
        wall_offset_s = time.time() - flushed_at
        self.record_stage(
            "delivery", oldest.received_at + wall_offset_s - oldest.publish_time.timestamp()
        )
        validate_s, first_validated_at = 0.0, flushed_at
        for entry in batch:
            validate_s = max(validate_s, entry.validated_at - entry.delivery.received_at)
            first_validated_at = min(first_validated_at, entry.validated_at)
        self.record_stage("validate", validate_s)
        self.record_stage("batch_wait", flushed_at - first_validated_at)

    def count_unexpected(self, stage: str) -> None:
        self.telemetry.unexpected_errors.add(1, {"topic": self.topic, "stage": stage})

    def _unexpected(self, stage: str, deliveries: Sequence[Delivery]) -> None:
        """Log the exception being handled once, with its stack, and nack ``deliveries``."""
        log.exception(
            "unexpected error, nacking",
            extra={
                "topic": self.topic,
                "stage": stage,
                "message_ids": [d.message_id for d in deliveries[:10]],
                "messages": len(deliveries),
            },
        )
        self.count_unexpected(stage)
        self._nack(deliveries)

    async def _flush_loop(self) -> None:
        delay_s = self.settings.max_batch_delay_ms / 1000
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            wait_s = self._oldest_at + delay_s - time.monotonic()
            # Group commit: with no batch committing nothing is gained by waiting, so
            # flush at once; while one commits, the next batch gathers behind it.
            idle = self.settings.flush_when_idle and not self._committing
            if not self._full() and wait_s > 0 and not self._closing and not idle:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), wait_s)
                continue
            await self._slots.acquire()
            self._start_flush(self._take())

    def _take(self) -> list[_Entry]:
        """The next batch: up to the size cap and the byte cap, at least one entry."""
        count, size = 0, 0
        for entry in self._pending[: self.settings.max_batch_size]:
            if count and size + len(entry.delivery.data) > self.settings.max_batch_bytes:
                break
            count += 1
            size += len(entry.delivery.data)
        batch, self._pending = self._pending[:count], self._pending[count:]
        self._pending_bytes -= size
        self._oldest_at = time.monotonic()
        return batch

    def _start_flush(self, batch: list[_Entry]) -> None:
        task = asyncio.create_task(self._flush(batch), name=f"flush-{self.topic}")
        self._flushes.add(task)

        def done(t: asyncio.Task[None]) -> None:
            # The flush loop waits on the slots themselves; what gathered behind this
            # batch was woken when its commit ended (``_commit``).
            self._flushes.discard(t)
            self._slots.release()

        task.add_done_callback(done)

    async def drain(self) -> None:
        """Flush everything pending now and wait for every flush in flight."""
        self._closing = True
        while self._pending:
            await self._slots.acquire()
            self._start_flush(self._take())
        while self._flushes:
            await asyncio.gather(*list(self._flushes), return_exceptions=True)

    def nack_pending(self) -> int:
        """Nack what was never flushed (shutdown past its budget); how many."""
        pending, self._pending = self._pending, []
        self._pending_bytes = 0
        for entry in pending:
            entry.delivery.nack()
        self.telemetry.nacked.add(len(pending), self._attributes)
        return len(pending)

    async def _flush(self, batch: list[_Entry]) -> None:
        with self.telemetry.tracer.start_as_current_span(
            f"batch {self.topic}",
            attributes={"messaging.batch.message_count": len(batch)},
            links=links_to_publishers(e.delivery.attributes for e in batch),
        ) as span:
            try:
                await self._settle(batch)
            except Exception:
                # The last resort (each step isolates its messages already): never ack
                # what we cannot vouch for.
                span.set_attribute("error", True)
                self._unexpected("settle", [e.delivery for e in batch if not e.delivery.settled])

    async def _settle(self, batch: list[_Entry]) -> None:
        # Counted per batch, not per message: an OpenTelemetry call costs as much as
        # validating a small payload.
        self._record_waits(batch, time.monotonic())
        self.telemetry.received.add(len(batch), self._attributes)
        valid = [e for e in batch if e.error is None]
        dead: list[tuple[Delivery, PermanentError]] = [
            (e.delivery, e.error) for e in batch if e.error is not None
        ]
        committed: list[Delivery] = []
        if valid:
            self.telemetry.batch_size.record(len(valid), self._attributes)
            started = time.monotonic()
            try:
                outcome, unexpected = await self._commit([e.item for e in valid])
            except WorkerError as error:
                log.warning(
                    "batch not committed, nacked for redelivery",
                    extra={"topic": self.topic, "messages": len(valid), "error": str(error)},
                )
                self._nack([e.delivery for e in valid])
                self.backoff.failed()
                valid = []
                outcome, unexpected = BatchOutcome(), []
            else:
                self.backoff.succeeded()
                commit_s = time.monotonic() - started
                self.telemetry.commit_latency_ms.record(commit_s * 1000, self._attributes)
                self.record_stage("commit", commit_s)
            if unexpected:
                self._nack([valid[i].delivery for i in unexpected])
            failures = outcome.failures
            dead.extend((valid[i].delivery, failures[i]) for i in sorted(failures))
            committed = [
                e.delivery
                for i, e in enumerate(valid)
                if i not in failures and not e.delivery.settled
            ]
            if committed and outcome.cache_keys and self.after_commit is not None:
                self.crash_points.reach(CrashPoint.AFTER_COMMIT)
                started = time.monotonic()
                try:
                    await self.after_commit(self.topic, outcome.cache_keys)
                except WorkerError as error:
                    # Redelivery repeats the (idempotent) write and its invalidations.
                    log.warning("invalidations not published, nacking", extra={"error": str(error)})
                    self._nack(committed)
                    committed = []
                else:
                    self.record_stage("invalidate", time.monotonic() - started)
                    self.crash_points.reach(CrashPoint.AFTER_PUBLISH)
        if committed:
            oldest = min(d.publish_time for d in committed)
            lag = datetime.now(UTC) - oldest
            self.telemetry.lag_ms.record(lag.total_seconds() * 1000, self._attributes)
            for delivery in committed:
                delivery.ack()
            self.telemetry.committed.add(len(committed), self._attributes)
        if dead:
            await self._dead_letter(dead)

    async def _commit(self, items: Sequence[Any]) -> tuple[BatchOutcome, list[int]]:
        """``_apply``, counted as committing: once it is done the database is free, and
        the batch gathered meanwhile may go while this one publishes its invalidations."""
        self._committing += 1
        try:
            return await self._apply(items)
        finally:
            self._committing -= 1
            self._wakeup.set()

    async def _apply(self, items: Sequence[Any]) -> tuple[BatchOutcome, list[int]]:
        """Apply a batch; if it is refused as a whole, find the culprits by halving.

        A permanent refusal of one item is its failure (dead-lettered); an unexpected
        exception of one item is listed apart (nacked, alone), so that neither costs
        its neighbours their commit. Transient errors propagate: the batch is retried.
        """
        try:
            return await self.handler.apply(self._handler_engine, items), []
        except PermanentError as error:
            if len(items) == 1:
                return BatchOutcome(failures={0: error}), []
        except WorkerError:
            raise
        except Exception:
            if len(items) == 1:
                log.exception("unexpected error applying a message", extra={"topic": self.topic})
                self.count_unexpected("apply")
                return BatchOutcome(), [0]
        middle = len(items) // 2
        left, left_unexpected = await self._apply(items[:middle])
        right, right_unexpected = await self._apply(items[middle:])
        failures = dict(left.failures)
        failures.update({middle + i: e for i, e in right.failures.items()})
        outcome = BatchOutcome(failures=failures, cache_keys=left.cache_keys | right.cache_keys)
        return outcome, left_unexpected + [middle + i for i in right_unexpected]

    async def _dead_letter(self, dead: list[tuple[Delivery, PermanentError]]) -> None:
        try:
            await self.dead_letters.publish(self.topic, dead)
        except WorkerError as publish_error:
            log.warning("dead letters not published, nacking", extra={"error": str(publish_error)})
            self._nack([d for d, _ in dead])
            return
        for delivery, error in dead:
            log.info(
                "message dead-lettered",
                extra={
                    "topic": self.topic,
                    "message_id": delivery.message_id,
                    "reason": error.reason,
                    "detail": error.detail,
                },
            )
            delivery.ack()
        for reason, count in Counter(error.reason for _, error in dead).items():
            self.telemetry.dead_lettered.add(count, {**self._attributes, "reason": reason})

    def _nack(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            delivery.nack()
        self.telemetry.nacked.add(len(deliveries), self._attributes)
