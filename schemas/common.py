"""Building blocks shared by every payload model: the strict base and field types."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, StrictStr

# RFC 3339 date-time: a full date, a time and a mandatory offset (``Z`` or ``+hh:mm``).
# datetime.fromisoformat alone would also take naive and date-only values.
_RFC3339 = re.compile(
    r"\A\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})\Z"
)


def parse_rfc3339(value: Any) -> datetime:
    """Parse an RFC 3339 timestamp; refuse anything without an offset."""
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("timestamp must carry a UTC offset")
        return value
    if not isinstance(value, str):
        raise ValueError("timestamp must be an RFC 3339 string")
    if not _RFC3339.match(value):
        raise ValueError("timestamp must be RFC 3339 with an offset (Z or +hh:mm)")
    text = value.replace("z", "Z").replace("t", "T")
    # Python keeps microseconds only: cut nanosecond fractions rather than refuse them.
    match = re.match(r"(.*\.\d{6})\d+(.*)", text)
    if match:
        text = match.group(1) + match.group(2)
    try:
        return datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"invalid timestamp: {exc}") from None


def _storable_text(value: str) -> str:
    # PostgreSQL text can hold neither NUL nor lone surrogates (not valid UTF-8).
    if "\x00" in value:
        raise ValueError("text may not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    return value


Timestamp = Annotated[datetime, BeforeValidator(parse_rfc3339)]
"""An aware datetime, from an RFC 3339 string with an offset."""


StorableText = Annotated[StrictStr, AfterValidator(_storable_text)]
"""A string stored byte for byte: strict type (no coercion), no NUL, valid Unicode.
Lengths are set per field with ``Field(min_length=..., max_length=...)`` in characters."""


class Payload(BaseModel):
    """Base of the wire payloads: frozen, unknown fields refused, finite numbers only."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        allow_inf_nan=False,
        str_strip_whitespace=False,
    )


class Response(BaseModel):
    """Base of the read responses."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
