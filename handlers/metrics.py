"""``metrics``: each sample identity stored once in the partitioned ``system_metrics``.

A sample's identity is its ``event_id``, or the UUIDv5 of its canonical JSON when it
has none, so a republished sample is the same sample. Because a primary key of a
partitioned table must contain the partition key, the identity is made unique across
months by ``system_metric_ids``: one statement inserts the identities, and only the
ones that were new go on into ``system_metrics``.

The identity itself is ``handlers.metric_identity``; the month partitions,
``handlers.metric_partitions``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from typing import Any, NamedTuple, cast

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from handlers.events import expired, validate_fields
from handlers.metric_identity import derived_identity
from handlers.metric_partitions import create_partitions, ensure_months_ahead
from schemas.cache_keys import recent_cache_key
from schemas.metrics import (
    BATCH_FIELDS,
    FUTURE_ERROR,
    MAX_FUTURE,
    SAMPLE_FIELDS,
    MetricSample,
    SampleFields,
    canonical_metadata,
    future_limit,
)
from worker.exceptions import ExpiredError, MissingPartitionError, SchemaViolationError
from worker.pipeline.handler import BatchOutcome
from worker.storage.database import driver_connection, transaction
from worker.topics import Topic

DEFAULT_RETENTION_DAYS = 90
"""METRICS_RETENTION_DAYS's default (CONTRACT.md)."""


_Row = tuple[uuid.UUID, str, str, float, str, datetime, "str | None"]
"""(id, service_name, metric_type, metric_value, unit, timestamp, metadata JSON)."""


class MetricsMessage(NamedTuple):
    """The rows of one message's samples: identity decided, timestamp defaulted to
    the publish time, metadata as canonical JSON text. (A named tuple: one is built
    per message, and a frozen dataclass costs twice as much to build.)"""

    rows: tuple[_Row, ...]


def message_rows(
    samples: Sequence[SampleFields],
    published_at: datetime,
    path: str | None,
    max_age: timedelta | None = None,
) -> MetricsMessage:
    """Check the rules pydantic's core left to us (future limit, retention window,
    metadata) and build the rows, in one pass. A violation names its field: ``path``,
    the sample's index and the field, or the field alone when ``path`` is None (a
    single sample). ``max_age`` is the retention window (None: not checked)."""
    limit = future_limit()
    cutoff = None if max_age is None else limit - MAX_FUTURE - max_age  # now - max_age
    # A sample without a timestamp takes the publish time: checked once, used if needed.
    publish_time_refused = published_at > limit or (cutoff is not None and published_at < cutoff)
    rows: list[_Row] = []
    for index, sample in enumerate(samples):
        timestamp = sample.get("timestamp")
        if timestamp is not None:
            # In UTC from here on, once: the identity's canonical text wants it, and
            # two datetimes in datetime.UTC compare, and asyncpg encodes one, faster
            # than in pydantic's fixed-offset tzinfo (whose offset is a Python call).
            timestamp = timestamp.astimezone(UTC)
            if timestamp > limit:
                raise _refused(path, index, "timestamp", FUTURE_ERROR)
            if cutoff is not None and timestamp < cutoff:
                raise _expired(path, index, "timestamp", max_age)
        elif publish_time_refused:
            if published_at > limit:
                problem = f"none given, and the publish time {FUTURE_ERROR}"
                raise _refused(path, index, "timestamp", problem)
            raise _expired(path, index, "timestamp (none given: the publish time)", max_age)
        metadata_object, metadata = sample.get("metadata"), None
        if metadata_object is not None:
            try:
                metadata = canonical_metadata(metadata_object)
            except ValueError as error:
                raise _refused(path, index, "metadata", str(error)) from None
        service_name, metric_type = sample["service_name"], sample["metric_type"]
        metric_value, unit = sample["metric_value"], sample["unit"]
        identity = sample.get("event_id") or derived_identity(
            service_name, metric_type, metric_value, unit, timestamp, metadata
        )
        rows.append(
            (
                identity,
                service_name,
                metric_type,
                metric_value,
                unit,
                timestamp or published_at,
                metadata,
            )
        )
    return MetricsMessage(tuple(rows))


def _where(path: str | None, index: int, field: str) -> str:
    return field if path is None else f"{path}{index}.{field}"


def _refused(path: str | None, index: int, field: str, problem: str) -> SchemaViolationError:
    return SchemaViolationError(f"{_where(path, index, field)}: {problem}")


def _expired(path: str | None, index: int, field: str, max_age: timedelta | None) -> ExpiredError:
    return expired(_where(path, index, field), max_age or timedelta(0), "system_metrics")


def samples_message(samples: Iterable[MetricSample], published_at: datetime) -> MetricsMessage:
    """The rows of samples validated as models (the service API's path)."""
    fields = [cast(SampleFields, s.model_dump(exclude_none=True)) for s in samples]
    return message_rows(fields, published_at, "")


# Column getters that run in C, for the per-row passes over a batch.
_ID, _TIMESTAMP, _SERIES = itemgetter(0), itemgetter(5), itemgetter(1, 2)


def _rows(messages: Sequence[MetricsMessage]) -> list[_Row]:
    """The batch's distinct rows, ordered by identity.

    The fixed order makes concurrent batches take their index locks in the same
    order (no deadlocks). Keyed by the identity's integer, which sorts in the same
    order as its bytes.
    Reversed, so that of duplicates inside the batch the first one stays.
    """
    every = [row for message in reversed(messages) for row in reversed(message.rows)]
    rows = {row[0].int: row for row in every}
    return [rows[key] for key in sorted(rows)]


# The identities go in first, narrow (two columns, one index), and tell which samples
# are new; only those are then copied into system_metrics. COPY writes the wide rows
# with PostgreSQL's multi-insert (pages at a time) instead of one heap insert per
# row, which is most of the cost of a plain INSERT ... SELECT. Both run in the
# batch's transaction: a concurrent batch holding the same identity waits on the
# unique index until this one commits, then finds it taken.
CLAIM_IDENTITIES_SQL = """
INSERT INTO system_metric_ids (id, "timestamp")
SELECT * FROM unnest($1::uuid[], $2::timestamptz[])
ON CONFLICT ON CONSTRAINT pk_system_metric_ids DO NOTHING
RETURNING id
"""

METRIC_COLUMNS = (
    "id",
    "service_name",
    "metric_type",
    "metric_value",
    "unit",
    "timestamp",
    "metadata",
)


# A batch of up to a few thousand rows goes in one statement instead: claim and wide
# insert in one round trip, where claim plus COPY take three or four (COPY asks for
# the column types first). Alone the two cost about the same; under load every round
# trip also waits for a turn of the event loop, which validation keeps busy, so the
# one statement costs the worker less CPU per message (figures: README, Batches).
CLAIM_AND_INSERT_SQL = f"""
WITH claimed AS ({CLAIM_IDENTITIES_SQL})
INSERT INTO system_metrics
    (id, service_name, metric_type, metric_value, unit, "timestamp", metadata)
SELECT r.id, r.service_name, r.metric_type, r.metric_value, r.unit, r.ts, r.metadata::jsonb
FROM unnest($1::uuid[], $3::text[], $4::text[], $5::float8[], $6::text[], $2::timestamptz[],
            $7::text[]) AS r(id, service_name, metric_type, metric_value, unit, ts, metadata)
JOIN claimed USING (id)
"""

COPY_FROM_ROWS = 5000
"""Batches of at least this many rows are written by claim plus COPY."""


async def write(conn: AsyncConnection, rows: Sequence[_Row]) -> None:
    """Store every new sample identity of the batch: identities claimed, new rows
    inserted (one statement) or copied (a large batch).

    A row whose month has no partition fails the statement; leaving ``transaction``
    turns that into ``MissingPartitionError``.
    """
    if not rows:
        return
    driver = await driver_connection(conn)
    ids, timestamps = list(map(_ID, rows)), list(map(_TIMESTAMP, rows))
    if len(rows) < COPY_FROM_ROWS:
        _, services, kinds, values, units, _, metadata = zip(*rows, strict=True)
        await driver.execute(
            CLAIM_AND_INSERT_SQL, ids, timestamps, services, kinds, values, units, metadata
        )
        return
    claimed = await driver.fetch(CLAIM_IDENTITIES_SQL, ids, timestamps)
    if len(claimed) < len(rows):
        # Some were stored before (a redelivery): only the claimed ones go on.
        fresh = {record[0].int for record in claimed}
        rows = [row for row in rows if row[0].int in fresh]
    if rows:
        await driver.copy_records_to_table("system_metrics", records=rows, columns=METRIC_COLUMNS)


def cache_keys(rows: Iterable[_Row]) -> frozenset[str]:
    """Every series the batch names, inserted now or before: a redelivered batch is a
    no-op write that still names its keys (invalidations are at least once)."""
    return frozenset(recent_cache_key(service, kind) for service, kind in set(map(_SERIES, rows)))


class MetricsHandler:
    """The ``metrics`` topic: one sample, or up to 1000 in ``{"metrics": [...]}``.

    A sample older than ``max_age`` (METRICS_RETENTION_DAYS) is ``expired``.
    """

    topic = "metrics"

    def __init__(self, max_age: timedelta = timedelta(days=DEFAULT_RETENTION_DAYS)) -> None:
        self.max_age = max_age

    def parse(self, payload: dict[str, Any], published_at: datetime) -> MetricsMessage:
        if "metrics" in payload:
            # All or nothing: one bad sample refuses the whole message.
            samples = validate_fields(BATCH_FIELDS, payload)["metrics"]
            return message_rows(samples, published_at, "metrics.", self.max_age)
        sample = validate_fields(SAMPLE_FIELDS, payload)
        return message_rows([sample], published_at, None, self.max_age)

    async def apply(self, engine: AsyncEngine, items: Sequence[MetricsMessage]) -> BatchOutcome:
        rows = _rows(items)
        try:
            async with transaction(engine) as conn:
                await write(conn, rows)
        except MissingPartitionError:
            # Months ahead are created at start; a sample outside them finds its
            # partition missing once, here, rather than every batch paying a check.
            await create_partitions(engine, map(_TIMESTAMP, rows))
            async with transaction(engine) as conn:
                await write(conn, rows)
        return BatchOutcome(cache_keys=cache_keys(rows))


TOPIC = Topic(
    name="metrics",
    subscription="metrics-worker",
    build_handler=lambda context: MetricsHandler(
        timedelta(days=context.settings.metrics_retention_days)
    ),
    on_start=ensure_months_ahead,
)
