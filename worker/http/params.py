"""Checks of the read API's parameters that the database would otherwise make.

PostgreSQL refuses a NUL in text (SQLSTATE 22021), and a time whose conversion to
UTC leaves the years 1 to 9999 fails inside the driver. Checked here, the client
gets a 422 naming the field, in the API's words, before any query runs.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import AfterValidator


def _no_nul(value: str | None) -> str | None:
    if value is not None and "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _utc(value: datetime | None) -> datetime | None:
    # A naive time is left to the route, which refuses it with its own message.
    if value is None or value.tzinfo is None:
        return value
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("out of range once converted to UTC") from None


NO_NUL = AfterValidator(_no_nul)
"""``Annotated`` metadata of a text parameter: a NUL character is a 422."""

IN_UTC = AfterValidator(_utc)
"""``Annotated`` metadata of a time parameter: converted to UTC, 422 if it cannot be."""
