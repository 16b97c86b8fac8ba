"""The read API (``/v1``): every cached read goes through the cache-aside path
(``worker.read.cached``) and answers with the cached JSON text as is, with no parse
and re-encode."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from schemas.backfill import BackfillJobResponse, BackfillStatus
from schemas.feedback import FeedbackStats
from schemas.metrics import MetricAggregate, MetricPoint, MetricRecord
from worker.exceptions import ValidationError
from worker.http.params import IN_UTC, NO_NUL
from worker.http.services import services
from worker.http.stats_read import MAX_INSIGHT_ID_CHARS
from worker.http.stats_read import ROUTE as STATS_ROUTE

router = APIRouter(prefix="/v1", tags=["read"])


def _json(text: str) -> Response:
    return Response(content=text, media_type="application/json")


# Served at the ASGI level when this route would answer it (worker.http.stats_read):
# the path and the id's limits are that module's.
@router.get(STATS_ROUTE.removeprefix(router.prefix), response_model=FeedbackStats)
async def feedback_stats(
    request: Request,
    insight_id: Annotated[str, Path(min_length=1, max_length=MAX_INSIGHT_ID_CHARS), NO_NUL],
) -> Response:
    return _json(await services(request).reads.feedback_stats_json(insight_id))


@router.get(
    "/backfill-jobs/{job_id}",
    response_model=BackfillJobResponse,
    responses={404: {"description": "unknown job"}},
)
async def backfill_job(request: Request, job_id: uuid.UUID) -> Response:
    return _json(await services(request).reads.backfill_job_json(job_id))


@router.get("/backfill-jobs")
async def backfill_jobs(
    request: Request,
    status: BackfillStatus | None = None,
    job_type: Annotated[str | None, Query(min_length=1, max_length=50), NO_NUL] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> list[BackfillJobResponse]:
    return await services(request).db.list_backfill_jobs(status, job_type, limit)


def _check_range(start: datetime | None, end: datetime | None) -> None:
    for name, moment in (("start", start), ("end", end)):
        if moment is not None and moment.tzinfo is None:
            raise ValidationError(f"{name}: must carry a UTC offset (RFC 3339)")
    if start is not None and end is not None and end <= start:
        raise ValidationError("end: must be after start")


@router.get(
    "/metrics", response_model=list[MetricRecord] | list[MetricAggregate] | list[MetricPoint]
)
async def metrics(
    request: Request,
    service_name: Annotated[str, Query(min_length=1, max_length=100), NO_NUL],
    metric_type: Annotated[str | None, Query(min_length=1, max_length=50), NO_NUL] = None,
    start: Annotated[datetime | None, IN_UTC] = None,
    end: Annotated[datetime | None, IN_UTC] = None,
    interval: Literal["hour", "day"] | None = None,
) -> list[MetricRecord] | list[MetricAggregate] | list[MetricPoint] | Response:
    """Aggregates with ``interval``; the cached latest 100 samples of a series when
    no range is given; otherwise the samples in ``[start, end)``, newest first."""
    _check_range(start, end)
    found = services(request)
    if interval is not None:
        if metric_type is None:
            raise ValidationError("metric_type: required with interval")
        return await found.db.aggregate_metrics(service_name, metric_type, interval, start, end)
    if metric_type is not None and start is None and end is None:
        return _json(await found.reads.recent_metrics_json(service_name, metric_type))
    return await found.db.get_metrics(service_name, metric_type, start, end)
