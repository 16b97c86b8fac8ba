"""The ledger of maintenance runs: one run per (task, UTC day), whoever asks for it.

A delivery (pull or push) or an operator's CLI command asks ``run_once`` for a run.
The ledger row (``maintenance_runs``) decides, in one statement, who owns it:

- no row, or a failed run, or a running one whose heartbeat is stale (its owner
  died): the caller claims it (``attempt`` + 1) and does the work, refreshing the
  heartbeat while it runs;
- a run that succeeded: nothing to do, the caller settles as done;
- a run in progress elsewhere: the caller waits for its outcome and settles the
  same way (done, or failed and nacked), never starting a second run beside it.

Times are the database's (``now()``), so the clocks of the processes never matter.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from worker.exceptions import MaintenanceError, WorkerError
from worker.storage.database import connection, transaction

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunKey:
    task: str
    day: date

    def __str__(self) -> str:
        return f"{self.task} of {self.day.isoformat()}"


@dataclass
class RunResult:
    """What a run's work reports to the ledger when it succeeds."""

    objects: list[dict[str, Any]] = field(default_factory=list)
    row_counts: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunRecord:
    """A ledger row as read."""

    key: RunKey
    status: str
    attempt: int
    owner: str
    dry_run: bool
    started_at: datetime
    heartbeat_at: datetime
    finished_at: datetime | None
    objects: list[dict[str, Any]]
    row_counts: dict[str, int]
    details: dict[str, Any]
    error: str | None
    stale: bool


@dataclass(frozen=True)
class RunOutcome:
    """How ``run_once`` settled: ``ran`` is true when this caller did the work."""

    record: RunRecord
    ran: bool


class RunLost(MaintenanceError):
    """The run's heartbeat could not be kept: another owner may have taken it over."""


_CLAIM = text(
    """
    INSERT INTO maintenance_runs AS r
        (task, run_day, status, attempt, owner, dry_run, started_at, heartbeat_at)
    VALUES (:task, :day, 'running', 1, :owner, :dry_run, now(), now())
    ON CONFLICT ON CONSTRAINT pk_maintenance_runs DO UPDATE
    SET status = 'running', attempt = r.attempt + 1, owner = excluded.owner,
        dry_run = excluded.dry_run, started_at = now(), heartbeat_at = now(),
        finished_at = NULL, error = NULL, row_counts = '{}', details = '{}'
    WHERE r.status = 'failed'
       OR (r.status = 'running' AND r.heartbeat_at < now() - make_interval(secs => :stale_s))
    RETURNING attempt
    """
)

_READ = text(
    """
    SELECT task, run_day, status, attempt, owner, dry_run, started_at, heartbeat_at,
           finished_at, objects, row_counts, details, error,
           heartbeat_at < now() - make_interval(secs => :stale_s) AS stale
    FROM maintenance_runs WHERE task = :task AND run_day = :day
    """
)

_HEARTBEAT = text(
    """
    UPDATE maintenance_runs SET heartbeat_at = now()
    WHERE task = :task AND run_day = :day AND attempt = :attempt AND status = 'running'
    """
)

_FINISH = text(
    """
    UPDATE maintenance_runs
    SET status = :status, finished_at = now(), heartbeat_at = now(), error = :error,
        -- A failure keeps what the attempt noted (retention's chunks stay archived);
        -- a success states the run's whole result, over every attempt.
        objects = CASE WHEN :failed THEN objects ELSE CAST(:objects AS jsonb) END,
        row_counts = CAST(:row_counts AS jsonb), details = CAST(:details AS jsonb)
    WHERE task = :task AND run_day = :day AND attempt = :attempt AND status = 'running'
    """
)

_NOTE = text(
    """
    UPDATE maintenance_runs SET objects = objects || CAST(:objects AS jsonb),
        heartbeat_at = now()
    WHERE task = :task AND run_day = :day AND attempt = :attempt AND status = 'running'
    """
)

_HISTORY = text(
    """
    SELECT task, run_day, status, attempt, owner, dry_run, started_at, heartbeat_at,
           finished_at, objects, row_counts, details, error,
           heartbeat_at < now() - make_interval(secs => :stale_s) AS stale
    FROM maintenance_runs WHERE task = :task ORDER BY run_day DESC LIMIT :limit
    """
)


def _record(row: Any) -> RunRecord:
    return RunRecord(
        key=RunKey(row.task, row.run_day),
        status=row.status,
        attempt=row.attempt,
        owner=row.owner,
        dry_run=row.dry_run,
        started_at=row.started_at,
        heartbeat_at=row.heartbeat_at,
        finished_at=row.finished_at,
        objects=list(row.objects),
        row_counts=dict(row.row_counts),
        details=dict(row.details),
        error=row.error,
        stale=bool(row.stale),
    )


def process_owner() -> str:
    """This process's name in the ledger: host, pid and a nonce (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Ledger:
    """Reads and writes ``maintenance_runs`` for one owner."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        heartbeat_s: float,
        stale_s: float,
        owner: str | None = None,
    ) -> None:
        self.engine = engine
        self.heartbeat_s = heartbeat_s
        self.stale_s = stale_s
        self.owner = owner or process_owner()

    def _key(self, key: RunKey) -> dict[str, Any]:
        return {"task": key.task, "day": key.day}

    async def claim(self, key: RunKey, *, dry_run: bool = False) -> int | None:
        """The attempt number if this owner now holds the run; None if it may not."""
        params = {**self._key(key), "owner": self.owner, "dry_run": dry_run}
        async with transaction(self.engine) as conn:
            result = await conn.execute(_CLAIM, {**params, "stale_s": self.stale_s})
            attempt = result.scalar_one_or_none()
        return None if attempt is None else int(attempt)

    async def read(self, key: RunKey) -> RunRecord | None:
        async with connection(self.engine) as conn:
            row = (await conn.execute(_READ, {**self._key(key), "stale_s": self.stale_s})).first()
        return None if row is None else _record(row)

    async def history(self, task: str, limit: int = 30) -> list[RunRecord]:
        """The latest runs of ``task``, newest day first."""
        params = {"task": task, "limit": limit, "stale_s": self.stale_s}
        async with connection(self.engine) as conn:
            rows = (await conn.execute(_HISTORY, params)).all()
        return [_record(row) for row in rows]

    async def heartbeat(self, key: RunKey, attempt: int) -> bool:
        """Refresh the heartbeat; False if the run is no longer this attempt's."""
        params = {**self._key(key), "attempt": attempt}
        async with transaction(self.engine) as conn:
            result = await conn.execute(_HEARTBEAT, params)
        return result.rowcount == 1

    async def note(self, key: RunKey, attempt: int, objects: list[dict[str, Any]]) -> None:
        """Add ``objects`` to the run's record while it runs (retention: each chunk)."""
        params = {**self._key(key), "attempt": attempt, "objects": json.dumps(objects)}
        async with transaction(self.engine) as conn:
            await conn.execute(_NOTE, params)

    async def finish(
        self, key: RunKey, attempt: int, result: RunResult | None, error: str | None
    ) -> bool:
        """Record the attempt's end (``result`` on success, ``error`` on failure)."""
        done = result or RunResult()
        params = {
            **self._key(key),
            "attempt": attempt,
            "status": "failed" if error is not None else "succeeded",
            "failed": error is not None,
            "error": None if error is None else error[:4000],
            "objects": json.dumps(done.objects),
            "row_counts": json.dumps(done.row_counts),
            "details": json.dumps(done.details, default=str),
        }
        async with transaction(self.engine) as conn:
            updated = await conn.execute(_FINISH, params)
        return updated.rowcount == 1

    async def keep_alive(self, key: RunKey, attempt: int) -> None:
        """Refresh the heartbeat until cancelled; raise ``RunLost`` when it can't be kept.

        The run is lost when another owner took it over, or when no heartbeat got
        through for half the stale time (by then a takeover may be under way).
        """
        last_ok = time.monotonic()
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                if not await self.heartbeat(key, attempt):
                    raise RunLost(f"the {key} run was taken over by another worker")
                last_ok = time.monotonic()
            except WorkerError as error:
                if isinstance(error, RunLost):
                    raise
                log.warning(
                    "maintenance heartbeat failed", extra={"run": str(key), "error": str(error)}
                )
                if time.monotonic() - last_ok > self.stale_s / 2:
                    raise RunLost(
                        f"the {key} run's heartbeat failed for too long: {error}"
                    ) from error


Work = Callable[[int], Coroutine[Any, Any, RunResult]]
"""A run's work, given its attempt number; raises to fail the run."""


async def run_once(ledger: Ledger, key: RunKey, work: Work, *, dry_run: bool = False) -> RunOutcome:
    """Do the run of ``key`` once across every process, or settle on its outcome.

    Returns when the run succeeded (here or elsewhere); raises ``MaintenanceError``
    when it failed (here or elsewhere), so that the delivery is nacked and retried.
    """
    while True:
        attempt = await ledger.claim(key, dry_run=dry_run)
        if attempt is not None:
            return RunOutcome(await _own(ledger, key, attempt, work), ran=True)
        ended = await _await_outcome(ledger, key)
        if ended is not None:
            return RunOutcome(ended, ran=False)
        # The holder went stale: try to take the run over.


async def _own(ledger: Ledger, key: RunKey, attempt: int, work: Work) -> RunRecord:
    """Do the work as ``attempt`` of ``key``, with a heartbeat; record how it ended."""
    log.info("maintenance run started", extra={"run": str(key), "attempt": attempt})
    started = time.monotonic()
    try:
        result = await _with_heartbeat(ledger, key, attempt, work)
    except BaseException as error:
        reason = _describe(error)
        with contextlib.suppress(WorkerError):
            # Shielded: at shutdown the failure is still recorded, so that the next
            # delivery takes the run over at once instead of waiting for staleness.
            await asyncio.shield(ledger.finish(key, attempt, None, reason))
        log.error(
            "maintenance run failed",
            extra={"run": str(key), "attempt": attempt, "error": reason},
        )
        if isinstance(error, MaintenanceError) or not isinstance(error, Exception):
            raise
        raise MaintenanceError(f"the {key} run failed: {reason}") from error
    if not await ledger.finish(key, attempt, result, None):
        raise RunLost(f"the {key} run was taken over before it could finish")
    log.info(
        "maintenance run succeeded",
        extra={
            "run": str(key),
            "attempt": attempt,
            "seconds": round(time.monotonic() - started, 3),
        },
    )
    record = await ledger.read(key)
    assert record is not None  # just written
    return record


async def _with_heartbeat(ledger: Ledger, key: RunKey, attempt: int, work: Work) -> RunResult:
    """``work(attempt)``, cancelled if the heartbeat is lost."""
    beating = asyncio.create_task(ledger.keep_alive(key, attempt), name=f"heartbeat {key}")
    working = asyncio.create_task(work(attempt), name=f"maintenance {key}")
    try:
        await asyncio.wait({beating, working}, return_when=asyncio.FIRST_COMPLETED)
        if working.done():
            return working.result()
        working.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await working
        beating.result()  # raises RunLost
        raise RunLost(f"the {key} run lost its heartbeat")
    finally:
        for task in (beating, working):
            task.cancel()
        await asyncio.gather(beating, working, return_exceptions=True)


async def _await_outcome(ledger: Ledger, key: RunKey) -> RunRecord | None:
    """Wait while the run is in progress elsewhere: its record once it ended, or None
    once its heartbeat went stale (the caller then takes it over)."""
    poll_s = min(max(ledger.heartbeat_s / 2, 0.2), 5.0)
    announced = False
    while True:
        record = await ledger.read(key)
        if record is None:
            return None  # deleted by hand: claim afresh
        if record.status == "succeeded":
            return record
        if record.status == "failed":
            raise MaintenanceError(
                f"the {key} run failed in attempt {record.attempt}: {record.error}"
            )
        if record.stale:
            log.warning("maintenance run owner died, taking over", extra={"run": str(key)})
            return None
        if not announced:
            log.info(
                "maintenance run in progress elsewhere, waiting for its outcome",
                extra={"run": str(key), "owner": record.owner, "attempt": record.attempt},
            )
            announced = True
        await asyncio.sleep(poll_s)


def _describe(error: BaseException) -> str:
    if isinstance(error, asyncio.CancelledError):
        return "interrupted (the process is stopping)"
    return str(error) or type(error).__name__
