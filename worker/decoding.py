"""Message data to a JSON object, refusing what CONTRACT.md refuses.

Generic, before any schema: at most 1 MiB, UTF-8, one JSON object, no NaN or
Infinity, no NUL and no lone surrogate in any string (PostgreSQL can store neither).
"""

from __future__ import annotations

import json
from typing import Any

from worker.exceptions import (
    InvalidEncodingError,
    InvalidJsonError,
    SchemaViolationError,
    TooLargeError,
)

MAX_MESSAGE_BYTES = 1024 * 1024


def _refuse_constant(name: str) -> Any:
    raise InvalidJsonError(f"{name} is not a JSON number")


def _bad_string(value: Any, path: str) -> str | None:
    """The path of the first string holding NUL or a lone surrogate, if any."""
    if isinstance(value, str):
        if "\x00" in value:
            return f"{path}: NUL character in text"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{path}: lone surrogate (not valid Unicode)"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _bad_string(key, f"{path}.<key>") or _bad_string(item, f"{path}.{key}")
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _bad_string(item, f"{path}[{index}]")
            if found:
                return found
    return None


def decode_json_object(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_MESSAGE_BYTES:
        raise TooLargeError(f"data: {len(data)} bytes, more than {MAX_MESSAGE_BYTES}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidEncodingError(f"data: not UTF-8 at byte {error.start}") from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as error:
        raise InvalidJsonError(
            f"data: {error.msg} at line {error.lineno} column {error.colno}"
        ) from None
    if not isinstance(value, dict):
        raise InvalidJsonError(f"data: a JSON object is required, got {type(value).__name__}")
    # Escapes are the only way to smuggle NUL or a surrogate into valid JSON text:
    # walk the value only when the raw text holds one.
    if "\\u0000" in text or "\\ud" in text.lower():
        found = _bad_string(value, "data")
        if found:
            raise (InvalidEncodingError if "surrogate" in found else SchemaViolationError)(found)
    return value
