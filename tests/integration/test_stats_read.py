"""``GET /v1/feedback/{insight_id}/stats`` is served at the ASGI level
(``worker.http.stats_read``): it must answer exactly as the FastAPI route that
documents it, hit or miss, for what it defers, and when the database is down."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from schemas.cache_keys import stats_cache_key
from tests.support.cache import own_redis_db
from tests.support.factories import T0, feedback
from tests.support.push import app_client
from tests.support.topics import REGISTRY
from worker.config import Settings
from worker.http.services import Services
from worker.http.stats_read import StatsRead

Answer = tuple[int, list[tuple[str, str]], bytes]

INSIGHT = "insight-asgi"
REQUESTS: Sequence[tuple[str, str]] = (
    ("GET", f"/v1/feedback/{INSIGHT}/stats"),  # a miss (the key is dropped first)
    ("GET", f"/v1/feedback/{INSIGHT}/stats"),  # then a hit
    ("GET", "/v1/feedback/never-rated/stats"),
    ("GET", f"/v1/feedback/{'x' * 100}/stats"),
    ("GET", "/v1/feedback/caf%C3%A9%20%E2%9C%93/stats"),
    # Deferred to FastAPI: its 422s, 404s, 405 and redirect.
    ("GET", f"/v1/feedback/{'x' * 101}/stats"),
    ("GET", "/v1/feedback/nul%00id/stats"),
    ("GET", "/v1/feedback//stats"),
    ("GET", "/v1/feedback/a%2Fb/stats"),
    ("GET", f"/v1/feedback/{INSIGHT}/stats/"),
    ("GET", f"/v1/feedback/{INSIGHT}/statsx"),
    ("HEAD", f"/v1/feedback/{INSIGHT}/stats"),
    ("POST", f"/v1/feedback/{INSIGHT}/stats"),
)


def answer(response: httpx.Response) -> Answer:
    headers = [(k, v) for k, v in response.headers.multi_items() if k != "date"]
    return response.status_code, headers, response.content


async def answers(settings: Settings, *, fastapi_route: bool) -> list[Answer]:
    services = Services.create(settings, REGISTRY)
    async with app_client(settings, services, fastapi_route=fastapi_route) as client:
        await services.cache.invalidate([stats_cache_key(INSIGHT)])
        return [answer(await client.request(method, path)) for method, path in REQUESTS]


async def test_served_at_the_asgi_level_as_the_route_would(
    pubsub_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    served: list[str] = []
    serve = StatsRead.__call__

    async def counted(self: StatsRead, scope: Scope, receive: Receive, send: Send) -> None:
        served.append(scope["path"])
        await serve(self, scope, receive, send)

    monkeypatch.setattr(StatsRead, "__call__", counted)
    async with own_redis_db(pubsub_settings) as rdb:
        writer = Services.create(rdb.settings, REGISTRY)
        try:
            await writer.db.apply_feedback_events(
                [
                    feedback(INSIGHT, "u1", occurred_at=T0, rating=4, comment="ok"),
                    feedback(INSIGHT, "u2", occurred_at=T0, rating=1, flag_type="spam"),
                ]
            )
        finally:
            await writer.close()
        asgi = await answers(rdb.settings, fastapi_route=False)
        assert len(served) == 5, "the five reads the route answers are served at the ASGI level"
        routed = await answers(rdb.settings, fastapi_route=True)
    assert len(served) == 5
    assert [a[0] for a in asgi[:5]] == [200] * 5
    assert {a[0] for a in asgi[5:]} >= {422, 404, 405}
    for (method, path), mine, theirs in zip(REQUESTS, asgi, routed, strict=True):
        assert mine == theirs, f"{method} {path}"


async def test_a_dead_database_is_the_apis_503_as_the_route_gives_it(
    pubsub_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    dead = dataclasses.replace(
        pubsub_settings, database_url="postgresql+asyncpg://postgres@127.0.0.1:1/utxoiq"
    )
    path = "/v1/feedback/dead-db/stats"
    given: list[Answer] = []
    async with own_redis_db(dead) as rdb:
        for fastapi_route in (False, True):
            services = Services.create(rdb.settings, REGISTRY)
            async with app_client(rdb.settings, services, fastapi_route=fastapi_route) as client:
                given.append(answer(await client.get(path)))
    asgi, routed = given
    assert asgi == routed
    status, _, body = asgi
    assert status == 503
    assert json.loads(body) == {
        "error": "unavailable",
        "detail": "a dependency is unavailable; retry",
    }
    # Each logs the reason, with the path.
    failures = [r for r in caplog.records if r.getMessage() == "request failed"]
    assert [getattr(r, "path", None) for r in failures] == [path, path]
