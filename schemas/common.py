"""Building blocks shared by every payload model: the strict base and field types."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    StrictStr,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

# RFC 3339 date-time: a full date, a time and a mandatory offset (``Z`` or ``+hh:mm``).
# Parsing alone would also take naive, date-only and numeric (Unix time) values.
RFC3339_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)


EARLIEST_TIMESTAMP = datetime(1, 1, 2, tzinfo=UTC)
LATEST_TIMESTAMP = datetime(9999, 12, 30, tzinfo=UTC)
"""The instants a timestamp may name: a day inside Python's datetime range, so that
any offset converts to UTC (``0001-01-01T00:00:00+14:00`` has no UTC datetime), and
PostgreSQL's timestamptz holds every one of them."""

TIMESTAMP_RANGE_ERROR = "timestamp out of range (0001-01-02 to 9999-12-30 UTC)"


class _Rfc3339:
    """Validates an aware datetime, or an RFC 3339 string with an offset, wholly in
    pydantic's core: a batch holds up to 1000 timestamps, and a Python callback for
    each costs more than the rest of their validation."""

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        aware = core_schema.datetime_schema(tz_constraint="aware")
        parsed = core_schema.union_schema(
            [
                core_schema.datetime_schema(strict=True, tz_constraint="aware"),
                core_schema.chain_schema(
                    [core_schema.str_schema(strict=True, pattern=RFC3339_PATTERN), aware]
                ),
            ],
            custom_error_type="timestamp_format",
            custom_error_message=(
                "timestamp must be an RFC 3339 string with an offset (Z or +hh:mm)"
            ),
        )
        # Compared as instants, in Rust: every later step may convert to UTC.
        in_range = core_schema.custom_error_schema(
            core_schema.datetime_schema(ge=EARLIEST_TIMESTAMP, le=LATEST_TIMESTAMP),
            custom_error_type="timestamp_range",
            custom_error_message=TIMESTAMP_RANGE_ERROR,
        )
        return core_schema.chain_schema([parsed, in_range])

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "format": "date-time"}


Timestamp = Annotated[datetime, _Rfc3339()]
"""An aware datetime, from an RFC 3339 string with an offset (checked and parsed in Rust)."""


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
