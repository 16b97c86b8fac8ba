"""The file ``dlq export`` writes and ``dlq replay --from-file`` reads, maybe edited.

JSON lines, one message each: ``data`` (base64), ``attributes`` (strings), and
``source_message_id``, which names the dead letter the line replaces (a line without it
falls back to its ``source_message_id`` attribute, then to ``message_id``). Every line
is checked before anything is published: a bad line refuses the whole file.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.exceptions import DeadLetterCommandError


@dataclass(frozen=True)
class FileEntry:
    source_message_id: str
    data: bytes
    attributes: dict[str, str]


def _entry(raw: Any) -> FileEntry:
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    attributes = raw.get("attributes", {})
    if not isinstance(attributes, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in attributes.items()
    ):
        raise ValueError("attributes must be an object of strings")
    data = raw.get("data")
    if not isinstance(data, str):
        raise ValueError("data must be a base64 string")
    source = raw.get("source_message_id") or attributes.get("source_message_id")
    source = source or raw.get("message_id")
    if not isinstance(source, str) or not source:
        raise ValueError("no source_message_id (nor message_id) names its dead letter")
    try:
        decoded = base64.b64decode(data, validate=True)
    except binascii.Error as error:
        raise ValueError(f"data is not base64: {error}") from None
    return FileEntry(source, decoded, attributes)


def read_entries(path: Path) -> list[FileEntry]:
    """Every line of ``path``; ``DeadLetterCommandError`` names the first bad one."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DeadLetterCommandError(f"{path}: cannot be read: {error}") from error
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append(_entry(json.loads(line)))
        except ValueError as error:  # json.JSONDecodeError is one
            raise DeadLetterCommandError(f"{path}:{number}: {error}; nothing replayed") from None
    seen: set[str] = set()
    for entry in entries:
        if entry.source_message_id in seen:
            raise DeadLetterCommandError(
                f"{path}: two lines replace dead letter {entry.source_message_id}; nothing replayed"
            )
        seen.add(entry.source_message_id)
    return entries
