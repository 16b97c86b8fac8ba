"""``DatabaseService``: the design document's data service layer.

A facade for callers that think in operations (the read API, the CLI, the demo)
rather than in event batches. Every write goes through the topic handlers, the same
batch statements the worker uses, so the effect rules of CONTRACT.md hold for both;
every read is a query of ``worker.read``; every error is one of ``worker.exceptions``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy.ext.asyncio import AsyncEngine

from handlers import backfill, feedback, metrics
from handlers.events import M, validate
from handlers.metric_identity import sample_identity
from schemas.backfill import BackfillJobResponse, BackfillProgressEvent, BackfillStatus
from schemas.cache_keys import RECENT_LIMIT
from schemas.feedback import FeedbackEvent, FeedbackRecord, FeedbackStats
from schemas.metrics import MetricAggregate, MetricPoint, MetricRecord, MetricSample
from worker.exceptions import NotFoundError, SchemaViolationError, ValidationError
from worker.pipeline.batching import AfterCommit
from worker.pipeline.handler import BatchOutcome
from worker.read import backfill as backfill_reads
from worker.read import feedback as feedback_reads
from worker.read import metrics as metric_reads
from worker.storage.database import connection


def _now() -> datetime:
    return datetime.now(UTC)


def _raise_first(outcome: BatchOutcome) -> BatchOutcome:
    for error in outcome.failures.values():
        raise error
    return outcome


def _validated(model: type[M], values: dict[str, Any]) -> M:
    """``handlers.events.validate``, with the service's ``ValidationError``."""
    try:
        return validate(model, values)
    except SchemaViolationError as error:
        raise ValidationError(error.detail) from None


class DatabaseService:
    """Async data access on one engine (one pool), errors from ``worker.exceptions``."""

    def __init__(self, engine: AsyncEngine, invalidate: AfterCommit | None) -> None:
        """``invalidate`` publishes the cache keys a write touched, after its commit, as
        the pipelines do (None only where no cache is in play: schema tests)."""
        self.engine = engine
        self.invalidate = invalidate
        # The writes are the worker's own: the same handlers, the same statements.
        self._backfill = backfill.BackfillHandler()
        self._feedback = feedback.FeedbackHandler()
        self._metrics = metrics.MetricsHandler()

    async def _committed(self, topic: str, outcome: BatchOutcome) -> BatchOutcome:
        """Publish the invalidations of a committed write: a cached value never
        outlives a write made here (raises ``PubSubError`` if they cannot go)."""
        if outcome.cache_keys and self.invalidate is not None:
            await self.invalidate(topic, outcome.cache_keys)
        return outcome

    # -- backfill jobs ---------------------------------------------------------------

    async def apply_backfill_events(self, events: Sequence[BackfillProgressEvent]) -> BatchOutcome:
        outcome = await self._backfill.apply(self.engine, events)
        return await self._committed(self._backfill.topic, outcome)

    async def create_backfill_job(
        self,
        *,
        job_type: str,
        start_block: int,
        end_block: int,
        created_by: str | None = None,
        job_id: uuid.UUID | None = None,
    ) -> BackfillJobResponse:
        event = _validated(
            BackfillProgressEvent,
            {
                "job_id": job_id or uuid.uuid4(),
                "job_type": job_type,
                "start_block": start_block,
                "end_block": end_block,
                "current_block": start_block,
                "status": "running",
                "created_by": created_by,
                "occurred_at": _now(),
            },
        )
        _raise_first(await self.apply_backfill_events([event]))
        return await self.get_backfill_job(event.job_id)

    async def _progress(
        self, job_id: uuid.UUID, status: BackfillStatus, **changes: Any
    ) -> BackfillJobResponse:
        job = await self.get_backfill_job(job_id)
        event = _validated(
            BackfillProgressEvent,
            {
                "job_id": job.job_id,
                "job_type": job.job_type,
                "start_block": job.start_block,
                "end_block": job.end_block,
                "current_block": job.current_block,
                "status": status,
                "occurred_at": _now(),
                **changes,
            },
        )
        _raise_first(await self.apply_backfill_events([event]))
        return await self.get_backfill_job(job_id)

    async def update_backfill_progress(
        self,
        job_id: uuid.UUID,
        current_block: int,
        *,
        status: BackfillStatus = "running",
        estimated_completion: datetime | None = None,
    ) -> BackfillJobResponse:
        return await self._progress(
            job_id, status, current_block=current_block, estimated_completion=estimated_completion
        )

    async def complete_backfill_job(self, job_id: uuid.UUID) -> BackfillJobResponse:
        job = await self.get_backfill_job(job_id)
        return await self._progress(job_id, "completed", current_block=job.end_block)

    async def fail_backfill_job(self, job_id: uuid.UUID, error_message: str) -> BackfillJobResponse:
        return await self._progress(job_id, "failed", error_message=error_message)

    async def get_backfill_job(self, job_id: uuid.UUID) -> BackfillJobResponse:
        async with connection(self.engine) as conn:
            job = await backfill_reads.get_job(conn, job_id)
        if job is None:
            raise NotFoundError(f"backfill job {job_id} not found")
        return job

    async def list_backfill_jobs(
        self,
        status: BackfillStatus | None = None,
        job_type: str | None = None,
        limit: int = 50,
    ) -> list[BackfillJobResponse]:
        if not 1 <= limit <= 1000:
            raise ValidationError("limit: must be between 1 and 1000")
        async with connection(self.engine) as conn:
            return await backfill_reads.list_jobs(
                conn, status=status, job_type=job_type, limit=limit
            )

    # -- feedback --------------------------------------------------------------------

    async def apply_feedback_events(self, events: Sequence[FeedbackEvent]) -> BatchOutcome:
        outcome = await self._feedback.apply(self.engine, events)
        return await self._committed(self._feedback.topic, outcome)

    async def create_feedback(self, event: FeedbackEvent) -> FeedbackRecord:
        """Upsert one feedback event; returns the row as stored (which may be newer)."""
        await self.apply_feedback_events([event])
        rows = await self.list_feedback(insight_id=event.insight_id, user_id=event.user_id)
        return rows[0]

    async def get_feedback_stats(self, insight_id: str) -> FeedbackStats:
        return await feedback_reads.stats(self.engine, insight_id)

    async def list_feedback(
        self,
        insight_id: str | None = None,
        user_id: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        limit: int = 100,
    ) -> list[FeedbackRecord]:
        if not 1 <= limit <= 1000:
            raise ValidationError("limit: must be between 1 and 1000")
        async with connection(self.engine) as conn:
            return await feedback_reads.list_feedback(
                conn, insight_id=insight_id, user_id=user_id, start=start, end=end, limit=limit
            )

    # -- metrics ---------------------------------------------------------------------

    async def apply_metric_messages(
        self, messages: Sequence[metrics.MetricsMessage]
    ) -> BatchOutcome:
        outcome = await self._metrics.apply(self.engine, messages)
        return await self._committed(self._metrics.topic, outcome)

    async def record_metric(self, sample: MetricSample) -> uuid.UUID:
        """Store one sample (once, however often called); returns its identity."""
        await self.record_metrics_batch([sample])
        return sample_identity(sample)

    async def record_metrics_batch(self, samples: Sequence[MetricSample]) -> list[uuid.UUID]:
        message = metrics.samples_message(samples, _now())
        await self.apply_metric_messages([message])
        return [sample_identity(s) for s in samples]

    async def get_metrics(
        self,
        service_name: str,
        metric_type: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        limit: int = 1000,
    ) -> list[MetricRecord]:
        if not 1 <= limit <= 10_000:
            raise ValidationError("limit: must be between 1 and 10000")
        async with connection(self.engine) as conn:
            return await metric_reads.get_metrics(
                conn,
                service_name=service_name,
                metric_type=metric_type,
                start=start,
                end=end,
                limit=limit,
            )

    async def recent_metrics(
        self, service_name: str, metric_type: str, limit: int = RECENT_LIMIT
    ) -> list[MetricPoint]:
        async with connection(self.engine) as conn:
            return await metric_reads.recent(conn, service_name, metric_type, limit)

    async def aggregate_metrics(
        self,
        service_name: str,
        metric_type: str,
        interval: Literal["hour", "day"],
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> list[MetricAggregate]:
        async with connection(self.engine) as conn:
            return await metric_reads.aggregate(
                conn,
                service_name=service_name,
                metric_type=metric_type,
                interval=interval,
                start=start,
                end=end,
            )
