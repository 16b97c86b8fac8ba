"""``maintenance``: the scheduled tasks (backup, retention) that Cloud Scheduler asks for.

The tasks themselves are not built yet. Until they are, a request is validated (an
unknown task is a ``schema_violation``) and then dead-lettered as ``unsupported``,
naming the task, so that it is neither left unread on the subscription nor lost:
an operator finds it in ``maintenance-dead-letter`` and can replay it once the task
exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from handlers.events import validate
from schemas.maintenance import MaintenanceRequest
from worker.exceptions import UnsupportedError
from worker.pipeline.handler import BatchOutcome
from worker.topics import Topic


class MaintenanceHandler:
    topic = "maintenance"

    def parse(self, payload: dict[str, Any], published_at: datetime) -> MaintenanceRequest:
        request = validate(MaintenanceRequest, payload)
        raise UnsupportedError(f"task: {request.task!r} is not built in this version")

    async def apply(self, engine: AsyncEngine, items: Sequence[MaintenanceRequest]) -> BatchOutcome:
        return BatchOutcome()  # parse lets no request through


TOPIC = Topic(
    name="maintenance",
    subscription="maintenance-worker",
    build_handler=lambda context: MaintenanceHandler(),
    invalidates_cache=False,
)
