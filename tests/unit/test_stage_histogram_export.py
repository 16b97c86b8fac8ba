"""``OTEL_METRICS_EXPORTER=console`` writes the metrics as one JSON line at exit, and
the latency benchmark's reader (``bench.stages``) gets each stage's quantiles back
from it within the exponential histogram's resolution."""

from __future__ import annotations

import random
import statistics
from pathlib import Path

import pytest

from bench.stages import read_stages
from worker.telemetry import create_telemetry


def test_the_console_export_gives_back_each_stage_quantiles(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "console")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "86400000")
    telemetry = create_telemetry()
    draw = random.Random(7)
    commits = [draw.lognormvariate(1.0, 0.6) for _ in range(5000)]  # ms, a long tail
    waits = [draw.uniform(0.0, 50.0) for _ in range(5000)]
    for value in commits:
        telemetry.stage_ms.record(value, {"topic": "metrics", "stage": "commit"})
    for value in waits:
        telemetry.stage_ms.record(value, {"topic": "metrics", "stage": "delivery"})
    telemetry.stage_ms.record(9.0, {"topic": "feedback", "stage": "commit"})
    telemetry.shutdown()  # the export at exit

    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1  # one line, however long
    export = tmp_path / "metrics.jsonl"
    export.write_text(lines[0] + "\n")
    stages = read_stages(export, "metrics")
    assert set(stages) == {"commit", "delivery"}
    for name, values in (("commit", commits), ("delivery", waits)):
        cuts = statistics.quantiles(values, n=100)
        found = stages[name]
        assert found.count == len(values) and found.max_ms == max(values)
        # The upper bound of the bucket holding the quantile: not below it (but for
        # the sample quantile's interpolation), at most a bucket's width above it.
        assert cuts[49] * 0.999 <= found.p50_ms <= cuts[49] * 1.05, (name, found, cuts[49])
        assert cuts[98] * 0.999 <= found.p99_ms <= cuts[98] * 1.05, (name, found, cuts[98])
    assert read_stages(export, "feedback")["commit"].max_ms == 9.0
