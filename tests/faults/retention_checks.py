"""The retention oracle of the fault suite: rows seeded past and inside their windows,
what every archive object holds, and the row-or-archive invariant of CONTRACT.md
(Retention and archives) checked between the two.

Written from the contract, not from ``handlers/retention``: the seeded rows are read
back whole before any run (every column, as PostgreSQL returns it), and an archived
line must carry each of them (the ``id`` of a backfill job as ``job_id``); an archive
object vouches for its rows only when its manifest matches its bytes (sha256, size,
lines) and ``archive_chunks`` records it as archived with that sha256. Only the I/O
(``open_store``) is the product's.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg

from tests.faults.checks import _Report, asyncpg_dsn
from worker.storage.objects import open_store

METRICS, FEEDBACK, JOBS = "system_metrics", "insight_feedback", "backfill_jobs"
TABLES = (METRICS, FEEDBACK, JOBS)
WINDOW_DAYS = {METRICS: 90, FEEDBACK: 730, JOBS: 180}
ID_FIELD = {METRICS: "id", FEEDBACK: "id", JOBS: "job_id"}
# Seeded rows are named so (service, insight, job type); the workload never is.
SEEDED_WHERE = {
    METRICS: "service_name LIKE 'seed-%'",
    FEEDBACK: "insight_id LIKE 'seed-%'",
    JOBS: "job_type LIKE 'seed-%'",
}

METRICS_SQL = """
WITH made AS (
    INSERT INTO system_metrics (id, service_name, metric_type, metric_value, unit,
        "timestamp", metadata)
    SELECT gen_random_uuid(), 'seed-' || $4::text || '-' || g % 5,
        (ARRAY['cpu', 'memory', 'latency'])[1 + g % 3], g * 0.1 + 0.25, 'percent',
        $1::timestamptz + ($2::timestamptz - $1::timestamptz) * (g::float8 / $3),
        CASE WHEN g % 4 = 0 THEN NULL ELSE jsonb_build_object('n', g, 'ratio', g / 7.0,
            'text', E'caf\\u00e9 "q" \\\\ \\n\\t' || g, 'tags', jsonb_build_array('a', g)) END
    FROM generate_series(0, $3 - 1) AS g
    RETURNING id, "timestamp"
)
INSERT INTO system_metric_ids (id, "timestamp") SELECT id, "timestamp" FROM made RETURNING id
"""
FEEDBACK_SQL = """
INSERT INTO insight_feedback (id, insight_id, user_id, rating, comment, flag_type,
    flag_reason, created_at, updated_at, event_key)
SELECT gen_random_uuid(), 'seed-' || $4::text || '-' || g / 20, 'seed-user-' || g % 20,
    CASE WHEN g % 6 = 0 THEN NULL ELSE 1 + g % 5 END,
    CASE WHEN g % 3 = 0 THEN NULL ELSE E'cr\\u00e8me "br\\u00fbl\\u00e9e" \\\\ ' || g || E'\\n' END,
    (ARRAY[NULL, 'inaccurate', 'misleading', 'spam', 'other'])[1 + g % 5],
    CASE WHEN g % 5 = 0 THEN NULL ELSE 'reason ' || g END,
    t - interval '3 days', t, decode(md5($4::text || g), 'hex')
FROM (SELECT g, $1::timestamptz + ($2::timestamptz - $1::timestamptz) * (g::float8 / $3) AS t
      FROM generate_series(0, $3 - 1) AS g) AS s
RETURNING id
"""
JOBS_SQL = """
INSERT INTO backfill_jobs (id, job_type, start_block, end_block, current_block, status,
    progress_percentage, estimated_completion, error_message, started_at, completed_at,
    created_by, status_event_at, status_event_key, first_event_key, completing_event_key)
SELECT gen_random_uuid(), 'seed-' || $4::text, g, g + 300,
    CASE WHEN st = 'completed' THEN g + 300 ELSE g + g % 301 END, st,
    CASE WHEN st = 'completed' THEN 100 ELSE round((g % 301) * 100.0 / 300, 2) END,
    CASE WHEN st IN ('running', 'paused') THEN t + interval '1 day' END,
    CASE WHEN st <> 'completed' THEN E'n\\u0153ud "\\u00e9chou\\u00e9" ' || g END,
    t - interval '2 days', CASE WHEN st = 'completed' THEN t END,
    (ARRAY[NULL, 'admin', 'ops-bot'])[1 + g % 3], t,
    decode(md5('s' || $4::text || g), 'hex'), decode(md5('f' || $4::text || g), 'hex'),
    CASE WHEN st = 'completed' THEN decode(md5('c' || $4::text || g), 'hex') END
FROM (SELECT g, ($5::text[])[1 + g % cardinality($5::text[])] AS st,
             $1::timestamptz + ($2::timestamptz - $1::timestamptz) * (g::float8 / $3) AS t
      FROM generate_series(0, $3 - 1) AS g) AS s
RETURNING id
"""


@dataclass(frozen=True)
class Segment:
    """Rows of one table seeded over [start, end) of its age column."""

    table: str
    tag: str
    rows: int
    start: datetime
    end: datetime
    past: bool
    """Past its window (and eligible): the run must archive it."""
    statuses: tuple[str, ...] = ("completed", "failed")


def month_start(moment: datetime, shift: int = 0) -> datetime:
    """The first instant (UTC) of ``moment``'s month, or of ``shift`` months later."""
    index = moment.year * 12 + moment.month - 1 + shift
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


@dataclass
class Seeded:
    """Every seeded row as read back before any run, and which must leave."""

    segments: list[Segment]
    rows: dict[str, dict[uuid.UUID, dict[str, Any]]] = field(default_factory=dict)
    past: dict[str, set[uuid.UUID]] = field(default_factory=lambda: defaultdict(set))

    def count(self, *, past: bool) -> int:
        return sum(s.rows for s in self.segments if s.past is past)


async def _seed_segment(conn: Any, s: Segment) -> list[uuid.UUID]:
    args: tuple[Any, ...] = (s.start, s.end, s.rows, s.tag)
    if s.table == METRICS:
        months = {month_start(s.start, i) for i in range(4) if month_start(s.start, i) < s.end}
        for first in months:
            await conn.execute("SELECT ensure_system_metrics_partition($1)", first)
        rows = await conn.fetch(METRICS_SQL, *args)
    elif s.table == FEEDBACK:
        rows = await conn.fetch(FEEDBACK_SQL, *args)
    else:
        rows = await conn.fetch(JOBS_SQL, *args, list(s.statuses))
    assert len(rows) == s.rows, (s, len(rows))
    return [r["id"] for r in rows]


async def seed(dsn: str, plan: list[Segment]) -> Seeded:
    """Seed ``plan`` server-side (INSERT ... SELECT), then read every seeded row back."""
    seeded = Seeded(plan)
    conn = await asyncpg.connect(asyncpg_dsn(dsn), timeout=10)
    try:
        for segment in seeded.segments:
            assert segment.start < segment.end, segment
            ids = await _seed_segment(conn, segment)
            if segment.past:
                seeded.past[segment.table].update(ids)
        seeded.rows = await seeded_rows(conn)
    finally:
        await conn.close()
    assert sum(len(r) for r in seeded.rows.values()) == sum(s.rows for s in seeded.segments)
    return seeded


async def seeded_rows(conn: Any) -> dict[str, dict[uuid.UUID, dict[str, Any]]]:
    """The seeded rows each table holds now, whole, by id."""
    found: dict[str, dict[uuid.UUID, dict[str, Any]]] = {}
    for table in TABLES:
        records = await conn.fetch(f"SELECT * FROM {table} WHERE {SEEDED_WHERE[table]}")
        found[table] = {r["id"]: dict(r) for r in records}
    return found


# -- the archive, read independently ------------------------------------------------------


@dataclass(frozen=True)
class ArchiveObject:
    table: str
    key: str
    sha256: str
    lines: list[dict[str, Any]]
    problems: list[str]
    """Why its manifest does not vouch for it (empty: it does)."""


def _manifest_problems(manifest: Any, key: str, uri: str, data: bytes, lines: int) -> list[str]:
    if not isinstance(manifest, dict):
        return ["manifest is not a JSON object"]
    name = key.rsplit("/", 1)[-1]
    want = {
        "object": uri,
        "rows": lines,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
        "table": key.split("/", 1)[0],
    }
    problems = [
        f"manifest {k}={manifest.get(k)!r}, object has {v!r}"
        for k, v in want.items()
        if manifest.get(k) != v
    ]
    edges = f"-{manifest.get('first_key')}-{manifest.get('last_key')}.jsonl.gz"
    if not name.endswith(edges):
        problems.append(f"name {name} does not end with the manifest's key range {edges}")
    return problems


async def read_archive(archive_url: str) -> list[ArchiveObject]:
    """Every object under the archive's table prefixes, read back and parsed; a
    manifest without its object is listed as an object without lines."""
    store = open_store(archive_url)
    objects = []
    try:
        for table in TABLES:
            keys = {info.key for info in await store.list(f"{table}/")}
            for key in sorted(k for k in keys if k.endswith(".jsonl.gz")):
                data = await store.read_bytes(key)
                text = gzip.decompress(data).decode("utf-8")
                lines = [json.loads(line, parse_float=Decimal) for line in text.splitlines()]
                if key + ".json" in keys:
                    manifest = json.loads(await store.read_bytes(key + ".json"))
                    problems = _manifest_problems(manifest, key, store.uri(key), data, len(lines))
                else:
                    problems = ["no manifest"]
                sha = hashlib.sha256(data).hexdigest()
                objects.append(ArchiveObject(table, key, sha, lines, problems))
            for orphan in sorted(k for k in keys if k.endswith(".json") and k[:-5] not in keys):
                objects.append(ArchiveObject(table, orphan, "", [], ["a manifest alone"]))
    finally:
        store.close()
    return objects


def _same(column: str, stored: Any, archived: Any) -> bool:
    """Whether an archived JSON value is the stored column value."""
    if stored is None or archived is None:
        return stored is None and archived is None
    if column == "metadata":
        return bool(json.loads(stored, parse_float=Decimal) == archived)
    if isinstance(stored, uuid.UUID | datetime | bytes) and not isinstance(archived, str):
        return False
    if isinstance(stored, uuid.UUID):
        return str(stored) == str(archived)
    if isinstance(stored, datetime):
        return datetime.fromisoformat(archived) == stored
    if isinstance(stored, bytes):
        return base64.b64decode(archived, validate=False) == stored
    if isinstance(stored, float | Decimal):
        return isinstance(archived, int | Decimal) and type(stored)(archived) == stored
    return bool(stored == archived) and type(stored) is type(archived)


def line_problems(table: str, line: dict[str, Any], stored: dict[str, Any]) -> list[str]:
    """What an archive line gets wrong about the row it archived (every column)."""
    want = {("job_id" if (table == JOBS and c == "id") else c): v for c, v in stored.items()}
    problems = [f"no {k}" for k in want.keys() - line.keys()]
    problems += [f"extra {k}" for k in line.keys() - want.keys()]
    column = {k: ("id" if k == "job_id" else k) for k in want}
    problems += [
        f"{k}={line[k]!r} (stored {v!r})"
        for k, v in want.items()
        if k in line and not _same(column[k], v, line[k])
    ]
    return problems


# -- the row-or-archive invariant ----------------------------------------------------------


@dataclass
class RetentionReport(_Report):
    """Where each seeded row is: its table, the archive, both or neither.

    At any moment (``final`` false, a run dead mid-way) a row may be in its table and
    in objects that no record vouches for yet; once a run succeeded (``final``), every
    past-window row is in exactly one vouched object and nowhere else, every other row
    in its table as it was.
    """

    final: bool = False
    objects: int = 0
    archived: int = 0
    """Gone from its table, in exactly one vouched object, past its window."""
    kept: int = 0
    """In its table and in no object (a past-window row counts here mid-run)."""
    both: int = 0
    """In its table and in an object (mid-run: an object no record vouches for yet)."""
    lost: int = 0
    """Neither in its table nor in any object."""
    doubled: int = 0
    """Gone from its table, in several objects."""
    unvouched: int = 0
    """Gone from its table, its one object not vouched for (manifest or record)."""
    undeleted: int = 0
    """In its table, and in an object recorded as archived."""
    stayed: int = 0
    """Past its window, in its table after a successful run."""
    wrong: int = 0
    """A line or a row in its table with other values than the row seeded."""
    unexpected: int = 0
    """An archived line that is no seeded past-window row."""
    bad_objects: int = 0
    """Objects whose manifest does not match them (ok mid-run if not relied upon)."""
    identities: int = 0
    """An archived sample's ``system_metric_ids`` row left, or a kept one's missing."""

    @property
    def ok(self) -> bool:
        always = (self.lost, self.doubled, self.unvouched, self.undeleted, self.wrong)
        at_end = (self.both, self.stayed, self.bad_objects, self.identities)
        return not any(always) and not self.unexpected and not (self.final and any(at_end))


Holder = tuple[ArchiveObject, dict[str, Any], bool]


async def _database(dsn: str, metric_ids: list[uuid.UUID]) -> tuple[Any, dict[str, str], Any]:
    conn = await asyncpg.connect(asyncpg_dsn(dsn), timeout=10)
    try:
        rows = await seeded_rows(conn)
        records = await conn.fetch("SELECT object_key, state, sha256 FROM archive_chunks")
        claimed = await conn.fetch(
            "SELECT id FROM system_metric_ids WHERE id = ANY($1::uuid[])", metric_ids
        )
    finally:
        await conn.close()
    archived = {r["object_key"]: r["sha256"] for r in records if r["state"] == "archived"}
    return rows, archived, {r["id"] for r in claimed}


def _holders(report: RetentionReport, objects: list[ArchiveObject], vouched: dict[str, str]) -> Any:
    holders: dict[str, dict[uuid.UUID, list[Holder]]] = {t: defaultdict(list) for t in TABLES}
    for obj in objects:
        ok = not obj.problems and vouched.get(obj.key) == obj.sha256
        if obj.problems:
            report._note("bad_objects", f"{obj.key}: {'; '.join(obj.problems)}")
        for line in obj.lines:
            holders[obj.table][uuid.UUID(str(line[ID_FIELD[obj.table]]))].append((obj, line, ok))
    return holders


def _place(
    report: RetentionReport,
    what: str,
    past: bool,
    stored: dict[str, Any] | None,
    held: list[Holder],
) -> None:
    """Classify one seeded row by where it is (``stored``: its row in its table now)."""
    if stored is None and not held:
        report._note("lost", what)
    elif stored is None and len(held) > 1:
        report._note("doubled", f"{what} in {[h[0].key for h in held]}")
    elif stored is None and not held[0][2]:
        report._note("unvouched", f"{what} only in {held[0][0].key}")
    elif stored is None:
        report.archived += 1
        if not past:
            report._note("unexpected", f"{what}: inside its window, archived in {held[0][0].key}")
    else:
        if held:
            report.both += 1
        else:
            report.kept += 1
        if any(h[2] for h in held):
            report._note("undeleted", f"{what}: in its table and in {held[0][0].key}")
        if past and report.final:
            report._note("stayed", f"{what}: past its window, still in its table")


async def check_invariant(
    dsn: str, archive_url: str, seeded: Seeded, *, final: bool, lines_every: int = 1
) -> RetentionReport:
    """The seeded rows against their tables and the archive now (see ``RetentionReport``);
    the columns of every ``lines_every``-th archived row (1: all of them)."""
    metric_ids = list(seeded.rows[METRICS])
    objects = await read_archive(archive_url)
    now_rows, vouched, claimed = await _database(dsn, metric_ids)
    report = RetentionReport(final=final, objects=sum(1 for o in objects if o.lines))
    holders = _holders(report, objects, vouched)
    for table in TABLES:
        for n, (row_id, seeded_row) in enumerate(seeded.rows[table].items()):
            what = f"{table} {row_id}"
            past = row_id in seeded.past[table]
            stored, held = now_rows[table].get(row_id), holders[table].pop(row_id, [])
            _place(report, what, past, stored, held)
            if stored is not None and stored != seeded_row:
                report._note("wrong", f"{what}: now {stored!r}, seeded {seeded_row!r}")
            for obj, line, _ in held if n % lines_every == 0 else ():
                if problems := line_problems(table, line, seeded_row):
                    report._note("wrong", f"{what} in {obj.key}: {', '.join(problems[:5])}")
        for row_id, held in holders[table].items():
            report._note("unexpected", f"{table} {row_id} in {held[0][0].key}: never seeded")
    if final:
        for row_id in metric_ids:
            if (row_id in claimed) == (row_id in seeded.past[METRICS]):
                state = "left" if row_id in claimed else "missing"
                report._note("identities", f"system_metric_ids of sample {row_id} {state}")
    return report
