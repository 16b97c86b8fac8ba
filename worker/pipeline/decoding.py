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


def _nul_path(value: Any) -> str | None:
    """The path of the first string (or key) holding a NUL character, if any.

    Iterative: the data comes from any publisher, and orjson accepts nesting far
    deeper than Python's recursion limit.
    """
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return path
        elif isinstance(item, dict):
            children: list[tuple[Any, str]] = []
            for key, child in item.items():
                if "\x00" in key:
                    return _join(path, "<key>")
                children.append((child, _join(path, str(key))))
            stack.extend(reversed(children))  # first key first, as a reader expects
        elif isinstance(item, list):
            stack.extend((item[i], f"{path}[{i}]") for i in reversed(range(len(item))))
    return None


MAX_PATH_CHARS = 200


def _shortened(path: str) -> str:
    """A path short enough that the detail (cut at 1024) still says what is wrong."""
    if len(path) <= MAX_PATH_CHARS:
        return path
    return f"{path[: MAX_PATH_CHARS // 2]}...{path[-MAX_PATH_CHARS // 2 :]}"


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


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
        found = _nul_path(value)
        if found is not None:
            raise SchemaViolationError(f"{_shortened(found)}: NUL character in text")
    return value
