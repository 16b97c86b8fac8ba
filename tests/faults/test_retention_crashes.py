"""Fault scenario (issue 17): a retention run killed at each of its crash points,
under live ingestion.

The database is seeded server-side with rows past their windows and rows inside them
in all three tables (``tests/faults/retention_checks.py``): two whole ``system_metrics``
months past the 90-day cutoff (exported, then dropped as partitions), the cutoff's
own month partly past it (deleted chunk by chunk), feedback past 730 days and not,
finished backfill jobs past 180 days and not, and old running or paused jobs (never
archived); several chunks of 10,000 rows in each. Every seeded row is read back whole
first: that is the oracle.

Meanwhile ``utxoiq-worker run`` ingests a seeded workload of fresh events (the fault
suite's, ``tests/faults/scenario.py``), and ``utxoiq-worker retention run`` is started
with ``WORKER_CRASH_AT`` on one crash point and hit, landing mid-run; it must SIGKILL
itself there. While it is dead, every seeded row must be in its table or in an
archive object (both is allowed then: an object no record vouches for yet), and a
row gone from its table must be in exactly one object vouched for by its manifest
and ``archive_chunks``; the rows gone and the rows in both must be those of the chunks
before and at the kill. Then ``retention run`` again (it takes the dead run over once
its heartbeat is 2 s stale) until it succeeds, and the final invariant: every row past
its window in exactly one vouched object, carrying each of its columns, and gone from
its table (its metric identity too); every other row in its table, unchanged; none in
both, none in neither. Last, the ingestion verdict (seeded rows still in their tables
removed first, so that the ingestion oracle sees its own rows alone): 0 lost, 0
applied twice, every poison dead-lettered, the Redis invariant.

``FAULT_MESSAGES`` and ``FAULT_SEED`` size and seed the workload (``make soak``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import asyncpg
import pytest

from handlers.retention.sweep import CHUNK_ROWS
from tests.faults.checks import asyncpg_dsn
from tests.faults.processes import Processes, WorkerProcess, worker_environment
from tests.faults.retention_checks import (
    FEEDBACK,
    JOBS,
    METRICS,
    SEEDED_WHERE,
    TABLES,
    WINDOW_DAYS,
    RetentionReport,
    Seeded,
    Segment,
    check_invariant,
    month_start,
    seed,
)
from tests.faults.scenario import Scenario
from tests.faults.test_crashes import (
    CRASH_ARMED,
    CRASH_MAX_RATE_PER_S,
    CRASH_REACHED,
    SIGKILLED,
    phase1_for,
    timeout_for,
)
from tests.faults.workload import Pacing
from tests.support.object_stores import drop_bucket, fresh_bucket_store
from worker.config import Settings
from worker.pipeline.crash_points import CrashPoint
from worker.pubsub.client import PubSub

SEED = int(os.environ.get("FAULT_SEED", "20261127"))
MESSAGES = int(os.environ.get("FAULT_MESSAGES", "1500"))
# Longer for bigger workloads (``make soak``), at most CRASH_MAX_RATE_PER_S.
PHASE1_S = phase1_for(MESSAGES, 12.0, CRASH_MAX_RATE_PER_S)
STEP_TRAFFIC_S = 5.0
"""Phase 1 goes on at least this long after each step of a scenario starts (the killed
run, the check while it is dead, each rerun): ingestion runs beside every step, however
slow the machine."""
RETENTION_START_S = 1.0
RUN_TIMEOUT_S = 120.0
RERUNS = 3
# While the run is dead, the columns of one archived row in this many are compared (every
# row's once it succeeded): the dead check is quicker, so ingestion still runs after it.
DEAD_LINES_EVERY = 50
RETENTION_ENV = {
    "MAINTENANCE_HEARTBEAT": "0.5",
    "MAINTENANCE_STALE_AFTER": "2",
    "METRICS_RETENTION_DAYS": str(WINDOW_DAYS[METRICS]),
    "FEEDBACK_RETENTION_DAYS": str(WINDOW_DAYS[FEEDBACK]),
    "BACKFILL_RETENTION_DAYS": str(WINDOW_DAYS[JOBS]),
}


# Rows kept start this long after the cutoff of the seeding moment: a test ends sooner,
# so every run of it sees them inside their window (and past-window rows, older than
# that cutoff, past it).
KEPT_MARGIN = timedelta(hours=1)
MONTH_ROWS, SWEPT_ROWS, KEPT_ROWS, OPEN_ROWS = 11_000, 21_000, 2_000, 1_000


def seed_plan(now: datetime) -> list[Segment]:
    """Two whole metrics months past the window (dropped), the cutoff's month partly
    past it (deleted chunk by chunk), and in every table rows past and inside."""
    cut = {table: now - timedelta(days=days) for table, days in WINDOW_DAYS.items()}
    second, day, kept = timedelta(seconds=1), timedelta(days=1), timedelta(days=20)
    month = month_start(cut[METRICS])
    earlier, last = month_start(month, -2), month_start(month, -1)
    m_in = cut[METRICS] + KEPT_MARGIN
    f_old, j_old = cut[FEEDBACK] - 300 * day, cut[JOBS] - 200 * day
    return [
        Segment(METRICS, "month-a", MONTH_ROWS, earlier, last, True),
        Segment(METRICS, "month-b", MONTH_ROWS, last, month, True),
        Segment(METRICS, "partial", SWEPT_ROWS, month, cut[METRICS] - second, True),
        Segment(METRICS, "kept", KEPT_ROWS, m_in, m_in + kept, False),
        Segment(FEEDBACK, "old", SWEPT_ROWS, f_old, cut[FEEDBACK] - second, True),
        Segment(FEEDBACK, "kept", KEPT_ROWS, cut[FEEDBACK] + KEPT_MARGIN, now - day, False),
        Segment(JOBS, "old", SWEPT_ROWS, j_old, cut[JOBS] - second, True),
        Segment(JOBS, "kept", KEPT_ROWS, cut[JOBS] + KEPT_MARGIN, now - day, False),
        # Running and paused jobs never leave, however old.
        Segment(JOBS, "open", OPEN_ROWS, j_old, cut[JOBS] - day, False, ("running", "paused")),
    ]


@dataclass(frozen=True)
class Kill:
    point: CrashPoint
    hit: int
    store: Literal["file", "gcs"]

    @property
    def crash_at(self) -> str:
        return f"{self.point.value}:{self.hit}"

    @property
    def name(self) -> str:
        return f"{self.point.value.removeprefix('retention_')}-{self.hit}-{self.store}"


# Metrics go first, their months in several streams at once (no fixed order between
# them): objects 1-7 (two whole months of 2 chunks, the partial month's 3), commits 1-5
# (2 drops, 3 partial chunks). Then feedback's objects 8-10 and commits 6-8, then
# backfill's 11-13 and 9-11, in order.
KILLS = [
    # Metrics' 4th object written; the 6th read back; the 2nd commit under way.
    Kill(CrashPoint.RETENTION_AFTER_EXPORT, 4, "file"),
    Kill(CrashPoint.RETENTION_AFTER_VERIFY, 6, "file"),
    Kill(CrashPoint.RETENTION_AFTER_DELETE, 2, "file"),
    # Feedback's last chunk committed, not noted in the ledger; the archive on Cloud Storage.
    Kill(CrashPoint.RETENTION_BEFORE_LEDGER, 8, "gcs"),
]
if os.environ.get("FAULT_SOAK"):
    # `make soak` (tests/faults/soak.py) adds the other store for two of them; `make
    # test` keeps every crash point once, within its time budget.
    KILLS += [
        Kill(CrashPoint.RETENTION_BEFORE_LEDGER, 8, "file"),
        # Backfill's 2nd chunk deleted, before its commit.
        Kill(CrashPoint.RETENTION_AFTER_DELETE, 10, "gcs"),
    ]


@dataclass(frozen=True)
class Step:
    """What a run commits at once: a whole month dropped, or one chunk deleted."""

    objects: int
    rows: int
    metrics: bool


@dataclass(frozen=True)
class Landing:
    """Where a kill lands. ``exact``: rows gone from their tables, rows in their table
    and in an object, objects committed but not noted in the ledger. None while metrics
    go: their months run at once, in no fixed order, so only a bound holds."""

    exact: tuple[int, int, int] | None
    metrics_rows: int

    def check(self, dead: RetentionReport, unnoted: int) -> None:
        if self.exact is not None:
            assert (dead.archived, dead.both, unnoted) == self.exact, dead.describe()
            return
        # Killed inside metrics: some exported rows are in their table too, and
        # nothing but metrics has been touched.
        assert dead.both > 0, dead.describe()
        assert dead.archived + dead.both <= self.metrics_rows, dead.describe()


def run_steps(seeded: Seeded) -> list[Step]:
    """A run's steps over the seeded rows, in its order (whole months, then each
    table's oldest rows first, in ``CHUNK_ROWS``)."""
    steps = []
    for segment in (s for s in seeded.segments if s.past):
        metrics = segment.table == METRICS
        if segment.tag.startswith("month"):
            steps.append(Step(math.ceil(segment.rows / CHUNK_ROWS), segment.rows, metrics))
            continue
        full, rest = divmod(segment.rows, CHUNK_ROWS)
        steps += [Step(1, CHUNK_ROWS, metrics)] * full + ([Step(1, rest, metrics)] if rest else [])
    return steps


def at_death(steps: list[Step], kill: Kill) -> Landing:
    """Where ``kill`` lands in a run of ``steps``."""
    metrics_rows = sum(s.rows for s in steps if s.metrics)
    if kill.point in (CrashPoint.RETENTION_AFTER_EXPORT, CrashPoint.RETENTION_AFTER_VERIFY):
        seen = 0
        for n, step in enumerate(steps):
            if kill.hit <= seen + step.objects:
                if step.metrics:
                    return Landing(None, metrics_rows)
                exported = min(step.rows, (kill.hit - seen) * CHUNK_ROWS)
                return Landing((sum(s.rows for s in steps[:n]), exported, 0), metrics_rows)
            seen += step.objects
        raise AssertionError(f"{kill.crash_at}: a run writes only {seen} objects")
    assert kill.hit <= len(steps), f"{kill.crash_at}: a run commits only {len(steps)} steps"
    step = steps[kill.hit - 1]
    if step.metrics:
        return Landing(None, metrics_rows)
    if kill.point is CrashPoint.RETENTION_AFTER_DELETE:
        return Landing((sum(s.rows for s in steps[: kill.hit - 1]), step.rows, 0), metrics_rows)
    return Landing((sum(s.rows for s in steps[: kill.hit]), 0, step.objects), metrics_rows)


@asynccontextmanager
async def archive_at(store: str, folder: Path) -> AsyncIterator[str]:
    """The ``ARCHIVE_URL`` of one test: a folder of its own, or a fresh bucket."""
    if store == "file":
        yield f"file://{folder}/archive"
        return
    bucket = await fresh_bucket_store("archive")
    try:
        yield bucket.url
    finally:
        await drop_bucket(bucket)


async def _query(dsn: str, sql: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(asyncpg_dsn(dsn), timeout=10)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


INGESTED_SQL = " + ".join(
    f"(SELECT count(*) FROM {table} WHERE NOT ({SEEDED_WHERE[table]}))" for table in TABLES
)


async def ingested(dsn: str) -> int:
    """Rows of the workload stored so far (no seeded row counts)."""
    [row] = await _query(dsn, f"SELECT {INGESTED_SQL} AS n")
    return int(row["n"])


async def ledger(dsn: str) -> dict[str, Any]:
    """Today's retention run in ``maintenance_runs``, and how many objects recorded as
    archived it has not noted (by sha256)."""
    [run] = await _query(dsn, "SELECT * FROM maintenance_runs WHERE task = 'retention'")
    noted = {o["sha256"] for o in json.loads(run["objects"]) if "sha256" in o}
    archived = await _query(dsn, "SELECT sha256 FROM archive_chunks WHERE state = 'archived'")
    return {
        "status": run["status"],
        "attempt": run["attempt"],
        "rows": sum(json.loads(run["row_counts"]).values()),
        "details": json.loads(run["details"]),
        "unnoted": sum(1 for r in archived if r["sha256"] not in noted),
    }


async def forget_seeded(dsn: str, seeded: Seeded) -> None:
    """Delete the seeded rows still stored (checked already), so that the ingestion
    oracle compares the tables with the workload alone."""
    conn = await asyncpg.connect(asyncpg_dsn(dsn), timeout=10)
    try:
        metric_ids = list(seeded.rows[METRICS])
        await conn.execute("DELETE FROM system_metric_ids WHERE id = ANY($1::uuid[])", metric_ids)
        for table in TABLES:
            await conn.execute(f"DELETE FROM {table} WHERE {SEEDED_WHERE[table]}")
    finally:
        await conn.close()


async def killed_run(processes: Processes, env: Mapping[str, str], kill: Kill) -> WorkerProcess:
    """``retention run`` armed at ``kill``: it must SIGKILL itself there."""
    armed = await processes.spawn(
        "retention-killed", ["retention", "run"], {**env, "WORKER_CRASH_AT": kill.crash_at}
    )
    code = await armed.wait_exit(RUN_TIMEOUT_S)
    assert code == SIGKILLED, f"{armed.name} exited {code}:\n{armed.log_tail()}"
    assert armed.logged(CRASH_ARMED), armed.log_tail()
    [reached] = armed.logged(CRASH_REACHED)
    assert (reached["crash_point"], reached["hit"]) == (kill.point.value, kill.hit)
    return armed


async def rerun_until_success(
    processes: Processes, env: Mapping[str, str], step: Callable[[], None]
) -> int:
    """``retention run`` until one exits 0 (``step`` called before each); how many it
    took."""
    failed: list[str] = []
    for n in range(1, RERUNS + 1):
        step()
        rerun = await processes.spawn(f"retention-rerun-{n}", ["retention", "run"], env)
        code = await rerun.wait_exit(RUN_TIMEOUT_S)
        if code == 0:
            if failed:
                print(f"\nretention reruns failed before one succeeded: {failed}")
            return n
        failed.append(f"{rerun.name} exited {code}:\n{rerun.log_tail(15)}")
    raise AssertionError("no retention rerun succeeded:\n" + "\n".join(failed))


def figures(kill: Kill, dead: RetentionReport, final: RetentionReport) -> dict[str, Any]:
    shown = ("objects", "archived", "kept", "both", "lost", "doubled", "wrong", "unexpected")
    return {
        "crash_at": kill.crash_at,
        "store": kill.store,
        "dead": {name: getattr(dead, name) for name in shown},
        "final": {name: getattr(final, name) for name in shown},
    }


@dataclass
class Observed:
    """What a killed run and its reruns left, for the assertions and the printout."""

    dead: RetentionReport
    dead_ledger: dict[str, Any]
    reruns: int
    ingested: list[int]
    seconds: float


async def kill_and_rerun(
    scenario: Scenario,
    processes: Processes,
    env: Mapping[str, str],
    kill: Kill,
    seeded: Seeded,
    pacing: Pacing,
) -> Observed:
    """Under live ingestion: the killed run, the invariant while it is dead, the reruns."""
    dsn, archive_url = scenario.dsn, env["ARCHIVE_URL"]

    def step() -> None:
        pacing.last_no_earlier_than(time.monotonic() + STEP_TRAFFIC_S)

    started = time.monotonic()
    counts = [await ingested(dsn)]
    step()
    armed = await killed_run(processes, env, kill)
    scenario.fault(f"{armed.name} died at WORKER_CRASH_AT={kill.crash_at}")
    counts.append(await ingested(dsn))
    step()
    dead = await check_invariant(
        dsn, archive_url, seeded, final=False, lines_every=DEAD_LINES_EVERY
    )
    dead_ledger = await ledger(dsn)
    reruns = await rerun_until_success(processes, env, step)
    counts.append(await ingested(dsn))
    return Observed(dead, dead_ledger, reruns, counts, time.monotonic() - started)


@pytest.mark.timeout(timeout_for(MESSAGES) + 60)
@pytest.mark.parametrize("kill", KILLS, ids=[k.name for k in KILLS])
async def test_scenario_retention_killed_at_each_crash_point_under_ingestion(
    kill: Kill,
    fault_settings: Settings,
    fault_pubsub: PubSub,
    processes: Processes,
    tmp_path: Path,
) -> None:
    dsn = fault_settings.database_url
    seeded = await seed(dsn, seed_plan(datetime.now(UTC)))
    landing = at_death(run_steps(seeded), kill)
    await processes.start_worker(worker_environment(fault_settings), name="ingest")
    scenario = Scenario.create(
        f"retention-{kill.name}", fault_settings, fault_pubsub, seed=SEED, messages=MESSAGES
    )
    async with archive_at(kill.store, tmp_path) as archive_url:
        env = worker_environment(fault_settings, ARCHIVE_URL=archive_url, **RETENTION_ENV)
        async with scenario.reading(seed=SEED), scenario.publishing(MESSAGES / PHASE1_S) as pacing:
            await scenario.at(RETENTION_START_S)
            seen = await kill_and_rerun(scenario, processes, env, kill, seeded, pacing)
        final = await check_invariant(dsn, archive_url, seeded, final=True)
    run = await ledger(dsn)
    print(f"\nretention scenario {json.dumps(figures(kill, seen.dead, final))}")
    print(
        f"  ledger {json.dumps(run)}; reruns {seen.reruns}; workload rows stored"
        f" {seen.ingested} (at the killed run's start, death, rerun's end);"
        f" killed run and reruns {seen.seconds:.1f} s"
    )

    assert seen.dead.ok, seen.dead.describe()
    # The kill landed where it was aimed: the steps before it committed, its own not.
    landing.check(seen.dead, seen.dead_ledger["unnoted"])
    assert final.ok, final.describe()
    assert final.archived == seeded.count(past=True), final.describe()
    assert final.kept == seeded.count(past=False), final.describe()
    assert (run["status"], run["attempt"]) == ("succeeded", 1 + seen.reruns), run
    # The day's record counts every attempt's archive, the killed one's included.
    assert (run["rows"], run["unnoted"]) == (final.archived, 0), run
    # Ingestion went on while the killed run and the reruns did.
    assert seen.ingested[0] < seen.ingested[1] < seen.ingested[2], (
        f"workload rows stored {seen.ingested}: nothing ingested meanwhile"
    )

    await forget_seeded(dsn, seeded)
    verdict = await scenario.verdict()
    verdict.assert_ok()
