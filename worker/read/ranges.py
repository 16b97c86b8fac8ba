"""Time ranges of the read queries: ``[start, end)``, either end open."""

from __future__ import annotations

from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Select

S = TypeVar("S", bound=Select[Any])


def within(
    query: S, column: ColumnElement[datetime], start: datetime | None, end: datetime | None
) -> S:
    """``query`` restricted to rows whose ``column`` is in ``[start, end)``."""
    if start is not None:
        query = query.where(column >= start)
    if end is not None:
        query = query.where(column < end)
    return query
