"""The worker's per-stage times (``worker.stage.duration``), read from the JSON line
OpenTelemetry's console exporter writes at exit (``bench.stack.start_worker``'s
``metrics_to``).

The histogram is exponential: bucket ``i`` of scale ``s`` holds values in
``(base**i, base**(i + 1)]`` with ``base = 2 ** 2 ** -s``. A quantile is read as the
upper bound of the bucket it falls in (capped at the recorded maximum), so it is
never below the true value and at most one bucket's width (under 5%) above it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.telemetry import STAGE_HISTOGRAM


@dataclass(frozen=True)
class StageTimes:
    count: int
    p50_ms: float
    p99_ms: float
    max_ms: float


def read_stages(path: Path, topic: str) -> dict[str, StageTimes]:
    """Each stage's recorded times for ``topic``, from the last export in ``path``."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise RuntimeError(f"the worker wrote no metrics to {path}")
    stages: dict[str, StageTimes] = {}
    for point in _points(json.loads(lines[-1]), STAGE_HISTOGRAM):
        attributes = point["attributes"]
        if attributes.get("topic") == topic and point["count"]:
            stages[attributes["stage"]] = StageTimes(
                count=point["count"],
                p50_ms=quantile(point, 0.50),
                p99_ms=quantile(point, 0.99),
                max_ms=point["max"],
            )
    return stages


def _points(export: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [
        point
        for resource in export["resource_metrics"]
        for scope in resource["scope_metrics"]
        for metric in scope["metrics"]
        if metric["name"] == name
        for point in metric["data"]["data_points"]
    ]


def quantile(point: dict[str, Any], q: float) -> float:
    """The ``q`` quantile of an exponential histogram data point (see module docstring)."""
    rank = q * point["count"]
    seen = point["zero_count"]
    if seen >= rank:
        return 0.0
    base = 2.0 ** (2.0 ** -point["scale"])
    offset = point["positive"]["offset"]
    for i, count in enumerate(point["positive"]["bucket_counts"]):
        seen += count
        if seen >= rank:
            return float(min(point["max"], base ** (offset + i + 1)))
    return float(point["max"])
