"""Retention rules that need no server: object names, gzip, line counts."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

from handlers.retention import archive
from handlers.retention.tables import METRICS, edge_key


def _line(at: str, row_id: uuid.UUID) -> bytes:
    return json.dumps({"id": str(row_id), "timestamp": at}).encode() + b"\n"


def test_object_names_are_made_of_the_edge_keys_and_the_first_month() -> None:
    row_id = uuid.UUID("12345678-0000-0000-0000-000000000000")
    at = datetime(2026, 7, 31, 23, 59, 59, 999999, tzinfo=UTC)
    key = edge_key(at, row_id)
    assert key == "20260731T235959999999Z_12345678"
    assert archive.object_key(METRICS, at, key, key) == (
        f"system_metrics/2026/07/system_metrics-{key}-{key}.jsonl.gz"
    )


def test_gzip_is_deterministic_and_lines_are_counted_back() -> None:
    raw = b"".join(_line(f"2026-01-01T00:00:{s:02d}+00:00", uuid.uuid4()) for s in range(50))
    assert archive.gzip_lines(raw) == archive.gzip_lines(raw)  # no time stamp inside
    assert archive.count_lines(archive.gzip_lines(raw)) == 50
