"""``maintenance``: the scheduled tasks Cloud Scheduler asks for (CONTRACT.md, maintenance).

A message names a task and, optionally, the day it is for (``scheduled_for``, else
the publish time's UTC day): together they are a run, done once across every worker
and every delivery by the run ledger (``handlers.maintenance_runs``). A run that
succeeded (here or elsewhere) settles its message as done; a failed run raises a
transient ``MaintenanceError``, so the message is nacked, retried by Pub/Sub, and
dead-lettered after its attempts. A run may take an hour: pull leases are extended
and a push request is held for as long as it lives.

A dry run (``"dry_run": true``) only says what the run would do: it changes nothing
and is not recorded as the day's run.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from handlers.backups.task import run_backup
from handlers.events import validate
from handlers.maintenance_runs import Ledger, RunKey, RunOutcome, RunResult, run_once
from handlers.retention.task import dry_run, run_retention, tables_of
from schemas.maintenance import MaintenanceRequest
from worker.config import Settings
from worker.pipeline.crash_points import CrashPoints
from worker.pipeline.handler import BatchOutcome
from worker.pipeline.settings import BatchSettings
from worker.telemetry import Telemetry
from worker.topics import Topic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MaintenanceOrder:
    """A validated request: the run it asks for."""

    run: RunKey
    dry_run: bool


def ledger(engine: AsyncEngine, settings: Settings) -> Ledger:
    return Ledger(
        engine,
        heartbeat_s=settings.maintenance_heartbeat_s,
        stale_s=settings.maintenance_stale_s,
    )


async def perform(
    engine: AsyncEngine,
    settings: Settings,
    run: RunKey,
    crash_points: CrashPoints | None = None,
) -> RunOutcome:
    """Do ``run`` once (or settle on its outcome elsewhere): the handler's and the CLI's path."""
    runs = ledger(engine, settings)
    points = crash_points or CrashPoints.disarmed()

    async def work(attempt: int) -> RunResult:
        if run.task == "backup":
            return await run_backup(settings, run, attempt)
        note = partial(runs.note, run, attempt)
        return await run_retention(settings, run, attempt, note=note, crash_points=points)

    return await run_once(runs, run, work)


async def rehearse(settings: Settings, order: MaintenanceOrder) -> None:
    """A dry run: say what the run would do, change nothing, record nothing."""
    if order.run.task == "backup":
        log.info("backup dry run: nothing to count", extra={"run": str(order.run)})
        return
    await dry_run(settings, tables_of(order.run))


class MaintenanceHandler:
    topic = "maintenance"

    def __init__(
        self, settings: Settings, crash_points: CrashPoints, telemetry: Telemetry | None = None
    ) -> None:
        self.settings = settings
        self.crash_points = crash_points
        self.telemetry = telemetry

    def parse(self, payload: dict[str, Any], published_at: datetime) -> MaintenanceOrder:
        request = validate(MaintenanceRequest, payload)  # an unknown task is refused here
        moment = request.scheduled_for or published_at
        return MaintenanceOrder(
            RunKey(request.task, moment.astimezone(UTC).date()), request.dry_run
        )

    async def apply(self, engine: AsyncEngine, items: Sequence[MaintenanceOrder]) -> BatchOutcome:
        """Each distinct run once, concurrently; duplicates in the batch share its outcome.

        Raises (nacking the batch) if any run failed: the redelivery of a run that
        succeeded meanwhile is a no-op.
        """
        orders = {(item.run, item.dry_run): item for item in items}
        # Every run ends before the batch settles: a failure of one never cancels another.
        results = await asyncio.gather(
            *(self._settle(engine, order) for order in orders.values()),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return BatchOutcome()

    async def _settle(self, engine: AsyncEngine, order: MaintenanceOrder) -> None:
        if order.dry_run:
            # Outside the ledger: a rehearsal must not stand for the day's real run.
            await rehearse(self.settings, order)
            return
        try:
            outcome = await perform(engine, self.settings, order.run, self.crash_points)
        except Exception:
            self._count(order.run, "failed")
            raise
        self._count(order.run, "succeeded" if outcome.ran else "done_elsewhere")
        finished = outcome.record.finished_at
        if self.telemetry is not None and order.run.task == "backup" and finished is not None:
            self.telemetry.backup_succeeded(finished)

    def _count(self, run: RunKey, outcome: str) -> None:
        if self.telemetry is not None:
            self.telemetry.maintenance_runs.add(1, {"task": run.task, "outcome": outcome})


TOPIC = Topic(
    name="maintenance",
    subscription="maintenance-worker",
    build_handler=lambda context: MaintenanceHandler(
        context.settings, context.crash_points, context.telemetry
    ),
    # One run per flush, a few flushes at once: a backup holds its flush for as long as
    # it runs, and a retention run (or a duplicate waiting on the backup) must not
    # queue behind it.
    batch=BatchSettings(max_batch_size=1, max_batch_delay_ms=0, max_concurrent_flushes=4),
    invalidates_cache=False,
)
