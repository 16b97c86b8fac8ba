"""``maintenance``: what Cloud Scheduler publishes (CONTRACT.md, maintenance)."""

from __future__ import annotations

from typing import Literal

from schemas.common import Payload, Timestamp

MaintenanceTask = Literal["backup", "retention"]


class MaintenanceRequest(Payload):
    """Run ``task`` for the UTC day of ``scheduled_for`` (else of the publish time)."""

    task: MaintenanceTask
    scheduled_for: Timestamp | None = None
    dry_run: bool = False
