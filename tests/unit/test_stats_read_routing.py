"""Which requests ``worker.http.stats_read`` takes from FastAPI: only those its route
would answer with the stats (its refusals stay FastAPI's)."""

from __future__ import annotations

from typing import Any

import pytest

from worker.http.stats_read import stats_insight_id


def scope(path: str, method: str = "GET", **extra: Any) -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "root_path": "", **extra}


@pytest.mark.parametrize(
    ("path", "insight_id"),
    [
        ("/v1/feedback/insight-1/stats", "insight-1"),
        ("/v1/feedback/x/stats", "x"),
        (f"/v1/feedback/{'y' * 100}/stats", "y" * 100),
        ("/v1/feedback/café ✓/stats", "café ✓"),
        ("/v1/feedback/stats/stats", "stats"),
    ],
)
def test_takes_a_stats_read_the_route_answers(path: str, insight_id: str) -> None:
    assert stats_insight_id(scope(path)) == insight_id


@pytest.mark.parametrize(
    "request_scope",
    [
        pytest.param(scope(f"/v1/feedback/{'y' * 101}/stats"), id="id-over-100-chars"),
        pytest.param(scope("/v1/feedback/a\x00b/stats"), id="nul"),
        pytest.param(scope("/v1/feedback//stats"), id="empty-id"),
        pytest.param(scope("/v1/feedback/stats"), id="no-id"),
        pytest.param(scope("/v1/feedback/a/b/stats"), id="slash-in-id"),
        pytest.param(scope("/v1/feedback/a/stats/"), id="trailing-slash"),
        pytest.param(scope("/v1/feedback/a/statsx"), id="other-path"),
        pytest.param(scope("/v2/feedback/a/stats"), id="other-version"),
        pytest.param(scope("/v1/feedback/a/stats", "HEAD"), id="head"),
        pytest.param(scope("/v1/feedback/a/stats", "POST"), id="post"),
        pytest.param(scope("/v1/feedback/a/stats", root_path="/api"), id="under-a-root-path"),
        pytest.param({"type": "websocket", "path": "/v1/feedback/a/stats"}, id="websocket"),
        pytest.param({"type": "lifespan"}, id="lifespan"),
    ],
)
def test_leaves_everything_else_to_fastapi(request_scope: dict[str, Any]) -> None:
    assert stats_insight_id(request_scope) is None
