"""Queries on ``system_metrics``: a series' latest samples, a range, hourly or daily
aggregates."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from sqlalchemy import func, literal_column, select
from sqlalchemy.ext.asyncio import AsyncConnection

from schemas.cache_keys import RECENT_LIMIT
from schemas.metrics import MetricAggregate, MetricPoint, MetricRecord
from worker.exceptions import ValidationError
from worker.read.ranges import within
from worker.storage.tables import system_metrics


async def recent(
    conn: AsyncConnection, service_name: str, metric_type: str, limit: int = RECENT_LIMIT
) -> list[MetricPoint]:
    """The latest samples of a series, newest first (the cached read)."""
    m = system_metrics.c
    rows = await conn.execute(
        select(m.timestamp, m.metric_value, m.unit, m.metadata)
        .where(m.service_name == service_name, m.metric_type == metric_type)
        .order_by(m.timestamp.desc(), m.id.desc())
        .limit(limit)
    )
    return [MetricPoint.model_validate(dict(r._mapping)) for r in rows]


async def get_metrics(
    conn: AsyncConnection,
    *,
    service_name: str,
    metric_type: str | None,
    start: datetime | None,
    end: datetime | None,
    limit: int,
) -> list[MetricRecord]:
    """Samples of a service in ``[start, end)``, newest first."""
    m = system_metrics.c
    query = (
        select(m.id, m.service_name, m.metric_type, m.metric_value, m.unit, m.timestamp, m.metadata)
        .where(m.service_name == service_name)
        .order_by(m.timestamp.desc(), m.id.desc())
        .limit(limit)
    )
    if metric_type is not None:
        query = query.where(m.metric_type == metric_type)
    query = within(query, m.timestamp, start, end)
    rows = await conn.execute(query)
    return [MetricRecord.model_validate(dict(r._mapping)) for r in rows]


async def aggregate(
    conn: AsyncConnection,
    *,
    service_name: str,
    metric_type: str,
    interval: Literal["hour", "day"],
    start: datetime | None,
    end: datetime | None,
) -> list[MetricAggregate]:
    """avg, min, max and count per UTC hour or day in ``[start, end)``, oldest first."""
    if interval not in ("hour", "day"):
        raise ValidationError(f"interval: must be 'hour' or 'day', got {interval!r}")
    m = system_metrics.c
    # A literal, not a parameter: GROUP BY must see the very same expression. Safe to
    # splice: interval is one of two fixed words, checked above.
    bucket = func.date_trunc(literal_column(f"'{interval}'"), m.timestamp, "UTC").label("bucket")
    query = (
        select(
            bucket,
            func.avg(m.metric_value).label("avg"),
            func.min(m.metric_value).label("min"),
            func.max(m.metric_value).label("max"),
            func.count().label("count"),
        )
        .where(m.service_name == service_name, m.metric_type == metric_type)
        .group_by(bucket)
        .order_by(bucket)
    )
    query = within(query, m.timestamp, start, end)
    rows = await conn.execute(query)
    return [MetricAggregate.model_validate({**r._mapping, "interval": interval}) for r in rows]
