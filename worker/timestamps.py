"""Times as CONTRACT.md writes them in attributes: RFC 3339, in UTC."""

from __future__ import annotations

from datetime import UTC, datetime


def rfc3339(moment: datetime) -> str:
    """``moment`` in UTC; in its own offset if UTC cannot hold it (year 1 at +14:00):
    a dead letter's attributes must never fail to build."""
    try:
        return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
    except OverflowError:
        return moment.isoformat()
