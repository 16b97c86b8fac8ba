"""``maintenance``: the scheduled tasks Cloud Scheduler asks for (CONTRACT.md, maintenance).

A message names a task and, optionally, the day it is for (``scheduled_for``, else
the publish time's UTC day): together they are a run, done once across every worker
and every delivery by the run ledger (``handlers.maintenance_runs``). A run that
succeeded (here or elsewhere) settles its message as done; a failed run raises a
transient ``MaintenanceError``, so the message is nacked, retried by Pub/Sub, and
dead-lettered after its attempts. A run may take an hour: pull leases are extended
and a push request is held for as long as it lives.

A valid task this version cannot run yet is dead-lettered as ``unsupported`` (an
operator replays it once the task exists).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from handlers.backups.task import run_backup
from handlers.events import validate
from handlers.maintenance_runs import Ledger, RunKey, RunOutcome, RunResult, run_once
from schemas.maintenance import MaintenanceRequest
from worker.config import Settings
from worker.exceptions import UnsupportedError
from worker.pipeline.batching import BatchSettings
from worker.pipeline.handler import BatchOutcome
from worker.topics import Topic

Task = Callable[[Settings, RunKey, int], Coroutine[Any, Any, RunResult]]
"""One attempt of a run: settings, the run, the attempt number."""

TASKS: Mapping[str, Task] = {"backup": run_backup}


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
    engine: AsyncEngine, settings: Settings, run: RunKey, *, dry_run: bool = False
) -> RunOutcome:
    """Do ``run`` once (or settle on its outcome elsewhere): the handler's and the CLI's path."""
    task = TASKS[run.task]
    return await run_once(
        ledger(engine, settings), run, partial(task, settings, run), dry_run=dry_run
    )


class MaintenanceHandler:
    topic = "maintenance"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def parse(self, payload: dict[str, Any], published_at: datetime) -> MaintenanceOrder:
        request = validate(MaintenanceRequest, payload)
        if request.task not in TASKS:
            raise UnsupportedError(f"task: {request.task!r} is not built in this version")
        moment = request.scheduled_for or published_at
        return MaintenanceOrder(
            RunKey(request.task, moment.astimezone(UTC).date()), request.dry_run
        )

    async def apply(self, engine: AsyncEngine, items: Sequence[MaintenanceOrder]) -> BatchOutcome:
        """Each distinct run once, concurrently; duplicates in the batch share its outcome.

        Raises (nacking the batch) if any run failed: the redelivery of a run that
        succeeded meanwhile is a no-op.
        """
        runs = {item.run: item for item in items}
        # Every run ends before the batch settles: a failure of one never cancels another.
        results = await asyncio.gather(
            *(perform(engine, self.settings, o.run, dry_run=o.dry_run) for o in runs.values()),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return BatchOutcome()


TOPIC = Topic(
    name="maintenance",
    subscription="maintenance-worker",
    build_handler=lambda context: MaintenanceHandler(context.settings),
    # One run per flush, a few flushes at once: a backup holds its flush for as long as
    # it runs, and a retention run (or a duplicate waiting on the backup) must not
    # queue behind it.
    batch=BatchSettings(max_batch_size=1, max_batch_delay_ms=0, max_concurrent_flushes=4),
    invalidates_cache=False,
)
