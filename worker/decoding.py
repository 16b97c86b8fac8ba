"""Message data to a JSON object, refusing what CONTRACT.md refuses.

Generic, before any schema: at most 1 MiB, UTF-8, one strict RFC 8259 JSON object
(no NaN or Infinity, no lone surrogate escapes), and no NUL in any string
(PostgreSQL text cannot hold it).
"""

from __future__ import annotations

from typing import Any

import orjson

from worker.exceptions import (
    InvalidEncodingError,
    InvalidJsonError,
    SchemaViolationError,
    TooLargeError,
)

MAX_MESSAGE_BYTES = 1024 * 1024


def _nul_path(value: Any, path: str) -> str | None:
    """The path of the first string (or key) holding a NUL character, if any."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _nul_path(key, f"{path}.<key>") or _nul_path(item, f"{path}.{key}")
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _nul_path(item, f"{path}[{index}]")
            if found:
                return found
    return None


def decode_json_object(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_MESSAGE_BYTES:
        raise TooLargeError(f"data: {len(data)} bytes, more than {MAX_MESSAGE_BYTES}")
    try:
        # orjson is strict: NaN, Infinity and lone surrogates are not JSON to it.
        value = orjson.loads(data)
    except orjson.JSONDecodeError as error:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise InvalidEncodingError(f"data: not UTF-8 at byte {bad.start}") from None
        raise InvalidJsonError(f"data: {error}") from None
    if not isinstance(value, dict):
        raise InvalidJsonError(f"data: a JSON object is required, got {type(value).__name__}")
    # An escape is the only way NUL gets into valid JSON text: walk only then.
    if b"\\u0000" in data:
        found = _nul_path(value, "data")
        if found:
            raise SchemaViolationError(f"{found.removeprefix('data.')}: NUL character in text")
    return value
