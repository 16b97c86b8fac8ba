"""The fault suite's verdicts: PostgreSQL against the oracle, the dead-letter topics
against the ledger, Redis against the database.

Each check returns a small report: counts, the first differences in words, ``ok``
and ``describe()``, so that a scenario can ``assert report.ok, report.describe()``
and print ``report.figures()``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import asyncpg
from pydantic import TypeAdapter
from redis import asyncio as aioredis
from sqlalchemy import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from schemas.cache_keys import JOB_TTL_S, RECENT_TTL_S, STATS_TTL_S
from schemas.metrics import MetricPoint
from tests.faults.oracle import Expected, FeedbackRow, JobRow, Ledger, MetricRow
from tests.support.emulator import Received, drain_dead_letters
from worker.exceptions import NotFoundError
from worker.pubsub.client import PubSub
from worker.read.service import DatabaseService
from worker.storage.cache import VERSION_PREFIX

SHOWN = 20
INGEST_TOPICS = ("backfill-progress", "feedback", "metrics")
DEAD_LETTER_ATTRIBUTES = (
    "dead_letter_reason",
    "dead_letter_detail",
    "source_topic",
    "source_subscription",
    "source_message_id",
    "source_publish_time",
    "failed_at",
)
MAX_DETAIL_CHARS = 1024


@dataclass
class _Report:
    differences: list[str] = field(default_factory=list)

    def _note(self, counter: str, text: str) -> None:
        setattr(self, counter, getattr(self, counter) + 1)
        if len(self.differences) < SHOWN:
            self.differences.append(f"{counter}: {text}")

    def figures(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "differences"}

    def describe(self) -> str:
        lines = [f"{type(self).__name__} {json.dumps(self.figures(), sort_keys=True)}"]
        lines += [f"  {d}" for d in self.differences]
        return "\n".join(lines)


def asyncpg_dsn(url: str) -> str:
    """A plain ``postgresql://`` DSN for asyncpg, from it or a SQLAlchemy URL."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def sqlalchemy_url(url: str) -> str:
    return make_url(url).set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


# -- PostgreSQL against the oracle -------------------------------------------------------


@dataclass
class DatabaseReport(_Report):
    expected: dict[str, int] = field(default_factory=dict)
    found: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    """An expected row or metric identity that is not stored."""
    doubled: int = 0
    """A key stored more than once (a metric identity in two rows, mostly)."""
    wrong: int = 0
    """A row stored with other values than the oracle's."""
    unexpected: int = 0
    """A stored row no valid event explains (an applied poison, say)."""

    @property
    def ok(self) -> bool:
        return self.lost == self.doubled == self.wrong == self.unexpected == 0


def _mismatches(want: Any, got: Any) -> list[str]:
    return [
        f"{name}={getattr(got, name)!r} (expected {value!r})"
        for name, value in asdict(want).items()
        if getattr(got, name) != value
    ]


def _metadata(text: str | None) -> Any:
    return None if text is None else json.loads(text)


async def compare_database(dsn: str, expected: Expected) -> DatabaseReport:
    """The three tables of the database at ``dsn`` (asyncpg or SQLAlchemy URL) compared
    with the oracle's ``expected`` state."""
    conn = await asyncpg.connect(asyncpg_dsn(dsn), timeout=10)
    try:
        jobs = await conn.fetch(
            "SELECT id, job_type, start_block, end_block, current_block, status,"
            " progress_percentage, estimated_completion, error_message, started_at,"
            " completed_at, created_by FROM backfill_jobs"
        )
        feedback = await conn.fetch(
            "SELECT insight_id, user_id, rating, comment, flag_type, flag_reason,"
            " created_at, updated_at FROM insight_feedback"
        )
        metrics = await conn.fetch(
            'SELECT id, service_name, metric_type, metric_value, unit, "timestamp",'
            " metadata::text AS metadata FROM system_metrics"
        )
        claimed = await conn.fetch('SELECT id, "timestamp" FROM system_metric_ids')
    finally:
        await conn.close()

    report = DatabaseReport(
        expected=expected.counts(),
        found={
            "backfill_jobs": len(jobs),
            "insight_feedback": len(feedback),
            "system_metrics": len(metrics),
            "system_metric_ids": len(claimed),
        },
    )
    _compare_jobs(report, expected, jobs)
    _compare_feedback(report, expected, feedback)
    _compare_metrics(report, expected, metrics, claimed)
    return report


def _compare_jobs(report: DatabaseReport, expected: Expected, records: list[Any]) -> None:
    stored: dict[uuid.UUID, list[JobRow]] = defaultdict(list)
    for r in records:
        values = dict(r)
        stored[uuid.UUID(str(values.pop("id")))].append(JobRow(**values))
    for job_id, want in expected.jobs.items():
        rows = stored.get(job_id, [])
        if not rows:
            report._note("lost", f"backfill job {job_id}")
            continue
        if len(rows) > 1:
            report._note("doubled", f"backfill job {job_id} stored {len(rows)} times")
        if problems := _mismatches(want, rows[0]):
            report._note("wrong", f"backfill job {job_id}: {', '.join(problems)}")
    for job_id in stored.keys() - expected.jobs.keys():
        report._note("unexpected", f"backfill job {job_id}")


def _compare_feedback(report: DatabaseReport, expected: Expected, records: list[Any]) -> None:
    stored: dict[tuple[str, str], list[FeedbackRow]] = defaultdict(list)
    for r in records:
        values = dict(r)
        pair = (values.pop("insight_id"), values.pop("user_id"))
        stored[pair].append(FeedbackRow(**values))
    for pair, want in expected.feedback.items():
        rows = stored.get(pair, [])
        if not rows:
            report._note("lost", f"feedback {pair}")
            continue
        if len(rows) > 1:
            report._note("doubled", f"feedback {pair} stored {len(rows)} times")
        if problems := _mismatches(want, rows[0]):
            report._note("wrong", f"feedback {pair}: {', '.join(problems)}")
    for pair in stored.keys() - expected.feedback.keys():
        report._note("unexpected", f"feedback {pair}")


def _compare_metrics(
    report: DatabaseReport, expected: Expected, records: list[Any], claimed: list[Any]
) -> None:
    stored: dict[uuid.UUID, list[MetricRow]] = defaultdict(list)
    for r in records:
        values = dict(r)
        identity = uuid.UUID(str(values.pop("id")))
        values["metadata"] = _metadata(values["metadata"])
        stored[identity].append(MetricRow(**values))
    claims: dict[uuid.UUID, list[Any]] = defaultdict(list)
    for r in claimed:
        claims[uuid.UUID(str(r["id"]))].append(r["timestamp"])
    for identity, want in expected.metrics.items():
        rows = stored.get(identity, [])
        if not rows:
            report._note(
                "lost", f"metric sample {identity} ({want.service_name}/{want.metric_type})"
            )
            continue
        if len(rows) > 1 or len(claims.get(identity, [])) > 1:
            report._note(
                "doubled",
                f"metric sample {identity}: {len(rows)} rows in system_metrics,"
                f" {len(claims.get(identity, []))} in system_metric_ids",
            )
        # Doubled rows are counted above; wrong is when no stored row is the right one.
        problems = min((_mismatches(want, row) for row in rows), key=len)
        if identity not in claims:
            problems.append("no system_metric_ids row")
        elif any(moment != want.timestamp for moment in claims[identity]):
            problems.append(f"system_metric_ids timestamp {claims[identity]!r}")
        if problems:
            report._note("wrong", f"metric sample {identity}: {', '.join(sorted(set(problems)))}")
    for identity in (stored.keys() | claims.keys()) - expected.metrics.keys():
        where = "system_metrics" if identity in stored else "system_metric_ids only"
        report._note("unexpected", f"metric identity {identity} ({where})")


async def wait_for_database(
    dsn: str, expected: Expected, *, timeout_s: float = 60.0, interval_s: float = 0.5
) -> DatabaseReport:
    """``compare_database`` until it is ok or ``timeout_s`` passed; the last report.

    For scenarios whose worker is another process: "phase 1 fully applied" is when
    the database holds the oracle's state of phase 1.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        report = await compare_database(dsn, expected)
        if report.ok or time.monotonic() >= deadline:
            return report
        await asyncio.sleep(interval_s)


# -- the dead-letter topics against the ledger --------------------------------------------


@dataclass
class DeadLetterReport(_Report):
    expected: int = 0
    """Poison messages confirmed published."""
    received: int = 0
    """Dead letters read from the three dead-letter subscriptions."""
    found: int = 0
    """Poison messages found in their dead-letter topic."""
    missing: int = 0
    wrong_reason: int = 0
    altered: int = 0
    """A dead letter whose data, attributes or ``dead_letter_*`` fields are not right."""
    misrouted: int = 0
    """Anything else in a dead-letter topic: a valid message, a poison in another
    topic's, something unknown, or a message Pub/Sub forwarded after 5 attempts."""
    repeated: int = 0
    """Extra copies of a poison's dead letter (a worker that died between publishing a
    dead letter and acking its message): at-least-once, reported, not a failure."""
    by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.missing == self.wrong_reason == self.altered == self.misrouted == 0


def _forwarded(letter: Received) -> bool:
    return any(name.startswith("CloudPubSubDeadLetterSource") for name in letter.attributes)


def _check_letter(report: DeadLetterReport, topic: str, letter: Received, ledger: Ledger) -> None:
    ledger_id = letter.attributes.get("ledger_id")
    entry = ledger.entries.get(ledger_id) if ledger_id else None
    what = f"{ledger_id or 'no ledger_id'} in {topic}-dead-letter"
    if _forwarded(letter):
        count = letter.attributes.get("CloudPubSubDeadLetterSourceDeliveryCount", "?")
        report._note("misrouted", f"{what}: forwarded by Pub/Sub after {count} deliveries")
        return
    if entry is None:
        report._note("misrouted", f"{what}: not in the ledger")
        return
    message = entry.message
    reason = letter.attributes.get("dead_letter_reason")
    detail = letter.attributes.get("dead_letter_detail", "")
    if message.applies:
        report._note("misrouted", f"{what}: a {message.kind} message ({reason}: {detail[:200]})")
        return
    if message.topic != topic:
        report._note("misrouted", f"{what}: a poison of {message.topic}")
        return
    report.by_reason[str(reason)] = report.by_reason.get(str(reason), 0) + 1
    if reason != message.reason:
        report._note(
            "wrong_reason",
            f"{what} ({message.case}): {reason} ({detail[:200]}), not {message.reason}",
        )
    problems = []
    if letter.data != message.data:
        problems.append("data changed")
    for name, value in message.attributes.items():
        if letter.attributes.get(name) != value:
            problems.append(f"attribute {name} changed")
    problems += [f"no {n}" for n in DEAD_LETTER_ATTRIBUTES if not letter.attributes.get(n)]
    if len(detail) > MAX_DETAIL_CHARS:
        problems.append(f"dead_letter_detail of {len(detail)} chars")
    if message.detail_hint and message.detail_hint not in detail:
        problems.append(f"dead_letter_detail {detail[:200]!r} does not name {message.detail_hint}")
    if letter.attributes.get("source_topic") != topic:
        problems.append(f"source_topic {letter.attributes.get('source_topic')!r}")
    source_id = letter.attributes.get("source_message_id")
    if entry.attempts == entry.confirmed and source_id not in entry.message_ids:
        problems.append(f"source_message_id {source_id!r} is not a published id")
    if problems:
        report._note("altered", f"{what} ({message.case}): {'; '.join(problems)}")


async def check_dead_letters(
    pubsub: PubSub, ledger: Ledger, *, timeout_s: float = 30.0, quiet_s: float = 1.0
) -> DeadLetterReport:
    """Drain the three dead-letter subscriptions (acking) and match them to the ledger.

    Every poison message confirmed published must be in its topic's dead-letter topic
    with the right ``dead_letter_reason``, data and attributes intact; nothing else
    may be there.
    """
    poisons = [e for e in ledger.entries.values() if not e.message.applies and e.attempts > 0]
    per_topic = Counter(e.message.topic for e in poisons if e.confirmed)
    letters = await asyncio.gather(
        *(
            drain_dead_letters(
                pubsub, topic, expected=per_topic[topic], timeout_s=timeout_s, quiet_s=quiet_s
            )
            for topic in INGEST_TOPICS
        )
    )
    report = DeadLetterReport(expected=sum(1 for e in poisons if e.confirmed))
    copies: Counter[str] = Counter()
    for topic, received in zip(INGEST_TOPICS, letters, strict=True):
        report.received += len(received)
        for letter in received:
            _check_letter(report, topic, letter, ledger)
            ledger_id = letter.attributes.get("ledger_id")
            entry = ledger.entries.get(ledger_id) if ledger_id else None
            if (
                entry is not None
                and not entry.message.applies
                and entry.message.topic == topic
                and not _forwarded(letter)
            ):
                copies[entry.message.ledger_id] += 1
    for entry in poisons:
        ledger_id = entry.message.ledger_id
        if copies[ledger_id]:
            report.found += 1
            # A poison published n times is dead-lettered n times: more is a repeat.
            report.repeated += max(0, copies[ledger_id] - max(entry.attempts, 1))
        elif entry.confirmed:
            report._note("missing", f"{ledger_id} ({entry.message.topic}, {entry.message.case})")
    return report


# -- Redis against the database -----------------------------------------------------------

_POINTS = TypeAdapter(list[MetricPoint])
TTL_S = {"feedback": STATS_TTL_S, "backfill": JOB_TTL_S, "metrics": RECENT_TTL_S}


@dataclass
class RedisReport(_Report):
    checked: dict[str, int] = field(default_factory=dict)
    """Cache entries compared, per kind."""
    stale: int = 0
    """An entry that differs from what the database gives for its key now."""
    bad_ttl: int = 0
    """An entry with no expiry, or one longer than CONTRACT.md's TTL."""
    version_tokens: int = 0
    foreign: int = 0
    """Keys that are neither cache entries nor version tokens (ignored)."""

    @property
    def ok(self) -> bool:
        return self.stale == self.bad_ttl == 0


def _kind(key: str) -> str | None:
    if key.startswith("feedback:stats:"):
        return "feedback"
    if key.startswith("backfill:job:"):
        return "backfill"
    if key.startswith("metrics:") and key.endswith(":recent") and key.count(":") >= 3:
        return "metrics"
    return None


async def _database_texts(db: DatabaseService, kind: str, key: str) -> list[str | None]:
    """What the read path would cache for ``key`` now, serialized as it does (one
    candidate per reading of an ambiguous metrics key; None: nothing to cache)."""
    if kind == "feedback":
        stats = await db.get_feedback_stats(key.removeprefix("feedback:stats:"))
        return [stats.model_dump_json()]
    if kind == "backfill":
        try:
            job_id = uuid.UUID(key.removeprefix("backfill:job:"))
        except ValueError:
            return [None]
        try:
            return [(await db.get_backfill_job(job_id)).model_dump_json()]
        except NotFoundError:
            return [None]
    # metrics:{service_name}:{metric_type}:recent; a ':' in a name makes several readings.
    parts = key.removeprefix("metrics:").removesuffix(":recent").split(":")
    texts: list[str | None] = []
    for cut in range(1, len(parts)):
        service, metric = ":".join(parts[:cut]), ":".join(parts[cut:])
        points = await db.recent_metrics(service, metric)
        texts.append(_POINTS.dump_json(points).decode("utf-8"))
    return texts


async def check_redis_invariant(redis_url: str, dsn: str) -> RedisReport:
    """Every cache entry in the Redis database of ``redis_url`` against PostgreSQL now.

    The "now" side is the project's own read functions (``DatabaseService``) serialized
    as ``worker/read/cached.py`` caches them: that is the definition of the right value.
    Version tokens (``cache-version:*``) are not entries. Call it once the worker is
    idle; an entry that expires between SCAN and GET is skipped.
    """
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=10)
    engine = create_async_engine(sqlalchemy_url(dsn), pool_size=2, max_overflow=0)
    db = DatabaseService(engine, None)
    report = RedisReport(checked={kind: 0 for kind in TTL_S})
    try:
        keys = sorted({str(k) async for k in redis.scan_iter(count=1000)})
        for key in keys:
            if key.startswith(VERSION_PREFIX):
                report.version_tokens += 1
                continue
            kind = _kind(key)
            if kind is None:
                report.foreign += 1
                continue
            async with redis.pipeline(transaction=True) as pipe:
                pipe.get(key)
                pipe.ttl(key)
                cached, ttl = await pipe.execute()
            if cached is None:
                continue
            report.checked[kind] += 1
            if ttl < 0 or ttl > TTL_S[kind]:
                report._note("bad_ttl", f"{key}: TTL {ttl} s (at most {TTL_S[kind]} s)")
            value = json.loads(cached)
            texts = await _database_texts(db, kind, key)
            now = [None if t is None else json.loads(t) for t in texts]
            if value not in now:
                report._note(
                    "stale", f"{key}: cached {cached[:300]} but database {texts[0]!s:.300}"
                )
    finally:
        await redis.aclose()
        await engine.dispose()
    return report


def figures(*reports: _Report) -> Mapping[str, Any]:
    """The reports' figures in one flat mapping, for a scenario's printout."""
    merged: dict[str, Any] = {}
    for report in reports:
        prefix = type(report).__name__.removesuffix("Report").lower()
        for name, value in report.figures().items():
            merged[f"{prefix}.{name}"] = value
    return merged
