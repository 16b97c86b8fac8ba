"""Building blocks shared by every payload model: the strict base and field types."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, StrictStr

# RFC 3339 date-time: a full date, a time and a mandatory offset (``Z`` or ``+hh:mm``).
# datetime.fromisoformat alone would also take naive and date-only values.
_RFC3339 = re.compile(
    r"\A\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})\Z"
)


def rfc3339_input(value: Any) -> Any:
    """Let through an aware datetime or an RFC 3339 string; pydantic parses the string.

    Refused here: numbers (pydantic would read them as Unix times), date-only and
    other ISO 8601 shapes. Naive values are refused by ``AwareDatetime`` itself.
    """
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _RFC3339.match(value):
        raise ValueError("timestamp must be an RFC 3339 string with an offset (Z or +hh:mm)")
    return value


Timestamp = Annotated[AwareDatetime, BeforeValidator(rfc3339_input)]
"""An aware datetime, from an RFC 3339 string with an offset (parsed in Rust)."""


StorableText = Annotated[StrictStr, Field(pattern=r"^[^\x00]*$")]
"""A string stored byte for byte: strict type (no coercion) and no NUL, which
PostgreSQL text cannot hold; lone surrogates are refused by pydantic itself. Checked
in pydantic's core, not in a Python callback: it runs for every text field.
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
