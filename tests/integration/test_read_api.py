"""The HTTP read API of ``utxoiq-worker serve`` (CONTRACT.md, HTTP): health,
readiness, and every ``/v1`` read, on the real stack, through the cache.

The app runs in the test's event loop (lifespan entered by hand, requests through
``httpx.ASGITransport``), on ``Services.create`` with a Redis database of its own.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import text

from schemas.backfill import BackfillJobResponse
from schemas.cache_keys import job_cache_key, recent_cache_key, stats_cache_key
from schemas.metrics import MetricRecord
from tests.support.cache import RedisDb, own_redis_db
from tests.support.factories import T0, feedback, progress, sample
from tests.support.push import app_client
from tests.support.topics import REGISTRY
from worker.config import Settings
from worker.http.services import Services
from worker.read.service import DatabaseService
from worker.storage.database import connection


@dataclass
class Api:
    client: httpx.AsyncClient
    services: Services
    rdb: RedisDb

    @property
    def db(self) -> DatabaseService:
        return self.services.db


@pytest_asyncio.fixture(loop_scope="session")
async def api(pubsub_settings: Settings) -> AsyncIterator[Api]:
    async with own_redis_db(pubsub_settings) as rdb:
        services = Services.create(rdb.settings, REGISTRY)
        async with app_client(rdb.settings, services) as client:
            yield Api(client, services, rdb)


def error_fields(response: httpx.Response) -> list[str]:
    """The field each 422 error names (the last element of its ``loc``)."""
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail, response.text
    return [str(error["loc"][-1]) for error in detail]


def as_json(model: Any) -> Any:
    return model.model_dump(mode="json")


# -- health ------------------------------------------------------------------------------


async def test_healthz(api: Api) -> None:
    response = await api.client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_with_everything_up(api: Api) -> None:
    response = await api.client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "status": "ready",
        "checks": {"database": True, "redis": True, "pubsub": True},
    }


# -- feedback stats ----------------------------------------------------------------------


async def test_feedback_stats_read_through_the_cache(api: Api) -> None:
    insight = "insight-api"
    await api.db.apply_feedback_events(
        [
            feedback(insight, "u1", occurred_at=T0, rating=5, comment="great"),
            feedback(insight, "u2", occurred_at=T0, rating=2, flag_type="spam"),
            feedback(insight, "u3", occurred_at=T0, rating=None, comment="meh"),
        ]
    )
    key = stats_cache_key(insight)
    assert await api.rdb.redis.exists(key) == 0

    first = await api.client.get(f"/v1/feedback/{insight}/stats")
    assert first.status_code == 200
    assert first.headers["content-type"] == "application/json"
    body = first.json()
    assert body == {
        "insight_id": insight,
        "total_ratings": 2,
        "average_rating": 3.5,
        "rating_distribution": {"1": 0, "2": 1, "3": 0, "4": 0, "5": 1},
        "total_comments": 2,
        "total_flags": 1,
        "flag_types": {"spam": 1},
    }
    assert body == as_json(await api.db.get_feedback_stats(insight))
    cached = await api.rdb.redis.get(key)
    assert cached is not None and json.loads(cached) == body
    assert 3590 <= await api.rdb.redis.ttl(key) <= 3600

    # A write that publishes no invalidation: the second read still answers from Redis.
    await api.db.apply_feedback_events([feedback(insight, "u4", occurred_at=T0, rating=1)])
    second = await api.client.get(f"/v1/feedback/{insight}/stats")
    assert second.status_code == 200
    assert second.json() == body, "the second read must be served from Redis"

    # Once invalidated, the read goes to the database again.
    await api.services.cache.invalidate([key])
    third = await api.client.get(f"/v1/feedback/{insight}/stats")
    assert third.json()["total_ratings"] == 3
    assert third.json() == as_json(await api.db.get_feedback_stats(insight))


async def test_feedback_stats_of_an_unknown_insight_are_zeros(api: Api) -> None:
    response = await api.client.get("/v1/feedback/never-rated/stats")
    assert response.status_code == 200
    assert response.json() == {
        "insight_id": "never-rated",
        "total_ratings": 0,
        "average_rating": 0.0,
        "rating_distribution": {"1": 0, "2": 0, "3": 0, "4": 0, "5": 0},
        "total_comments": 0,
        "total_flags": 0,
        "flag_types": {},
    }


async def test_feedback_stats_insight_id_over_100_chars_is_422(api: Api) -> None:
    response = await api.client.get(f"/v1/feedback/{'x' * 101}/stats")
    assert error_fields(response) == ["insight_id"]


# -- backfill jobs -----------------------------------------------------------------------


async def seed_jobs(db: DatabaseService) -> dict[str, BackfillJobResponse]:
    """Three jobs: running (blocks), completed (blocks), failed (transactions)."""
    ids = {name: uuid.uuid4() for name in ("running", "completed", "failed")}
    await db.apply_backfill_events(
        [
            progress(ids["running"], occurred_at=T0 + timedelta(minutes=3), current_block=150),
            progress(
                ids["completed"],
                occurred_at=T0 + timedelta(minutes=2),
                current_block=200,
                status="completed",
            ),
            progress(
                ids["failed"],
                occurred_at=T0 + timedelta(minutes=1),
                current_block=120,
                status="failed",
                job_type="transactions",
                error_message="node went away",
            ),
        ]
    )
    return {name: await db.get_backfill_job(job_id) for name, job_id in ids.items()}


async def test_backfill_job_found_through_the_cache(api: Api) -> None:
    jobs = await seed_jobs(api.db)
    job = jobs["running"]
    response = await api.client.get(f"/v1/backfill-jobs/{job.job_id}")
    assert response.status_code == 200
    body = response.json()
    assert body == as_json(job)
    assert body["current_block"] == 150 and body["status"] == "running"
    assert body["progress_percentage"] == 50.0  # a JSON number, not "50.00"
    cached = await api.rdb.redis.get(job_cache_key(job.job_id))
    assert cached is not None and json.loads(cached) == body
    assert 290 <= await api.rdb.redis.ttl(job_cache_key(job.job_id)) <= 300


async def test_unknown_backfill_job_is_404_and_not_cached(api: Api) -> None:
    unknown = uuid.uuid4()
    response = await api.client.get(f"/v1/backfill-jobs/{unknown}")
    assert response.status_code == 404
    body = response.json()
    assert body["error"] == "not_found"
    assert str(unknown) in body["detail"]
    assert await api.rdb.redis.exists(job_cache_key(unknown)) == 0


async def test_backfill_job_id_not_a_uuid_is_422(api: Api) -> None:
    response = await api.client.get("/v1/backfill-jobs/not-a-uuid")
    assert error_fields(response) == ["job_id"]
    assert response.json()["detail"][0]["loc"] == ["path", "job_id"]


async def test_backfill_job_list_and_filters(api: Api) -> None:
    jobs = await seed_jobs(api.db)

    async def listed(**params: Any) -> list[str]:
        response = await api.client.get("/v1/backfill-jobs", params=params)
        assert response.status_code == 200, response.text
        return [job["job_id"] for job in response.json()]

    def ids(*names: str) -> list[str]:
        return [str(jobs[name].job_id) for name in names]

    # Most recently started first.
    assert await listed() == ids("running", "completed", "failed")
    assert await listed(status="completed") == ids("completed")
    assert await listed(status="failed") == ids("failed")
    assert await listed(status="paused") == []
    assert await listed(job_type="blocks") == ids("running", "completed")
    assert await listed(job_type="transactions", status="failed") == ids("failed")
    assert await listed(job_type="transactions", status="running") == []
    assert await listed(limit=1) == ids("running")
    assert await listed(limit=1000) == ids("running", "completed", "failed")
    full = await api.client.get("/v1/backfill-jobs", params={"status": "failed"})
    assert full.json() == [as_json(jobs["failed"])]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "5000"}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"status": "bogus"}, "status"),
        ({"job_type": ""}, "job_type"),
    ],
)
async def test_backfill_job_list_refuses_bad_parameters(
    api: Api, params: dict[str, str], field: str
) -> None:
    response = await api.client.get("/v1/backfill-jobs", params=params)
    assert error_fields(response) == [field]


# -- metrics -----------------------------------------------------------------------------


@dataclass
class Series:
    start: datetime  # an hour boundary
    values: list[float]  # one sample every 20 minutes from ``start``


async def seed_metrics(db: DatabaseService) -> Series:
    start = (datetime.now(UTC) - timedelta(hours=5)).replace(minute=0, second=0, microsecond=0)
    values = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]  # two hours: 10, 20, 30 | 40, 50, 60
    await db.record_metrics_batch(
        [
            sample(
                service_name="web-api",
                metric_type="cpu",
                metric_value=value,
                timestamp=start + timedelta(minutes=20 * n),
                metadata={"n": n},
            )
            for n, value in enumerate(values)
        ]
        + [
            sample(
                service_name="web-api",
                metric_type="memory",
                metric_value=512.0,
                unit="MiB",
                timestamp=start + timedelta(minutes=5),
            ),
            sample(service_name="db", metric_type="cpu", metric_value=99.0, timestamp=start),
        ]
    )
    return Series(start, values)


def iso(moment: datetime) -> str:
    return moment.isoformat()


async def test_recent_metrics_when_no_range_through_the_cache(api: Api) -> None:
    series = await seed_metrics(api.db)
    params = {"service_name": "web-api", "metric_type": "cpu"}
    response = await api.client.get("/v1/metrics", params=params)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [p["metric_value"] for p in body] == series.values[::-1], "newest first"
    assert set(body[0]) == {"timestamp", "metric_value", "unit", "metadata"}
    assert body[0]["metadata"] == {"n": 5}
    assert body == [as_json(p) for p in await api.db.recent_metrics("web-api", "cpu")]
    key = recent_cache_key("web-api", "cpu")
    cached = await api.rdb.redis.get(key)
    assert cached is not None and json.loads(cached) == body
    assert 290 <= await api.rdb.redis.ttl(key) <= 300

    # Served from Redis: a sample written behind the cache's back is not seen yet.
    await api.db.record_metric(
        sample(service_name="web-api", metric_type="cpu", timestamp=series.start)
    )
    again = await api.client.get("/v1/metrics", params=params)
    assert again.json() == body


async def test_metrics_in_a_range_newest_first(api: Api) -> None:
    series = await seed_metrics(api.db)
    params = {
        "service_name": "web-api",
        "metric_type": "cpu",
        "start": iso(series.start + timedelta(minutes=20)),
        "end": iso(series.start + timedelta(minutes=80)),  # exclusive
    }
    response = await api.client.get("/v1/metrics", params=params)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["metric_value"] for r in body] == [40.0, 30.0, 20.0]
    assert {r["service_name"] for r in body} == {"web-api"}
    assert set(body[0]) == set(MetricRecord.model_fields)
    assert await api.rdb.redis.exists(recent_cache_key("web-api", "cpu")) == 0

    # Every type of the service when metric_type is left out, with a start only.
    everything = await api.client.get(
        "/v1/metrics", params={"service_name": "web-api", "start": iso(series.start)}
    )
    assert everything.status_code == 200
    types = sorted(r["metric_type"] for r in everything.json())
    assert types == ["cpu"] * 6 + ["memory"]


async def test_metrics_aggregated_by_hour(api: Api) -> None:
    series = await seed_metrics(api.db)
    response = await api.client.get(
        "/v1/metrics",
        params={"service_name": "web-api", "metric_type": "cpu", "interval": "hour"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [(b["interval"], b["avg"], b["min"], b["max"], b["count"]) for b in body] == [
        ("hour", 20.0, 10.0, 30.0, 3),
        ("hour", 50.0, 40.0, 60.0, 3),
    ]
    buckets = [datetime.fromisoformat(b["bucket"]) for b in body]
    assert buckets == [series.start, series.start + timedelta(hours=1)]

    daily = await api.client.get(
        "/v1/metrics",
        params={
            "service_name": "web-api",
            "metric_type": "cpu",
            "interval": "day",
            "start": iso(series.start + timedelta(minutes=60)),
        },
    )
    assert daily.status_code == 200
    assert sum(b["count"] for b in daily.json()) == 3


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"service_name": "web-api", "metric_type": "cpu", "interval": "week"}, "interval"),
        ({"metric_type": "cpu"}, "service_name"),
        ({"service_name": "web-api", "interval": "hour"}, "metric_type"),
        (
            {"service_name": "web-api", "metric_type": "cpu", "start": "2026-11-21T10:00:00"},
            "start",
        ),
        (
            {"service_name": "web-api", "metric_type": "cpu", "end": "2026-11-21T10:00:00"},
            "end",
        ),
        (
            {
                "service_name": "web-api",
                "start": "2026-11-21T10:00:00Z",
                "end": "2026-11-21T09:00:00Z",
            },
            "end",
        ),
        ({"service_name": "web-api", "start": "yesterday"}, "start"),
        ({"service_name": ""}, "service_name"),
    ],
    ids=[
        "interval-week",
        "no-service-name",
        "interval-without-metric-type",
        "naive-start",
        "naive-end",
        "end-before-start",
        "start-not-a-time",
        "empty-service-name",
    ],
)
async def test_metrics_refuses_bad_parameters(api: Api, params: dict[str, str], field: str) -> None:
    response = await api.client.get("/v1/metrics", params=params)
    assert error_fields(response) == [field]


# -- error bodies: the API's own words, never the database's ------------------------------

DATABASE_WORDS = ("database", "22021", "asyncpg", "query argument", "$", "Traceback")


def assert_api_words(response: httpx.Response) -> None:
    for word in DATABASE_WORDS:
        assert word not in response.text, response.text
    assert "input" not in str(response.json()), "a 422 must not echo the request"


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("/v1/feedback/a%00b/stats", {}, "insight_id"),
        ("/v1/backfill-jobs", {"job_type": "a\x00b"}, "job_type"),
        ("/v1/metrics", {"service_name": "web\x00api"}, "service_name"),
        ("/v1/metrics", {"service_name": "web-api", "metric_type": "\x00"}, "metric_type"),
        (
            "/v1/metrics",
            {"service_name": "web-api", "metric_type": "cpu\x00", "interval": "hour"},
            "metric_type",
        ),
    ],
    ids=["insight_id", "job_type", "service_name", "metric_type", "metric_type-aggregate"],
)
async def test_a_nul_character_is_422_naming_the_field(
    api: Api, path: str, params: dict[str, str], field: str
) -> None:
    response = await api.client.get(path, params=params)
    assert error_fields(response) == [field]
    assert response.json()["detail"][0]["msg"] == "Value error, must not contain NUL characters"
    assert_api_words(response)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"start": "0001-01-01T00:00:00+14:00"}, "start"),
        ({"start": "9999-12-31T23:59:59-14:00"}, "start"),
        ({"start": "2026-01-01T00:00:00Z", "end": "9999-12-31T23:59:59-14:00"}, "end"),
        ({"metric_type": "cpu", "interval": "day", "start": "0001-01-01T00:59:59+01:00"}, "start"),
    ],
    ids=["start-before-year-1", "start-after-year-9999", "end-after-year-9999", "aggregate"],
)
async def test_a_time_out_of_range_in_utc_is_422_naming_the_field(
    api: Api, params: dict[str, str], field: str
) -> None:
    response = await api.client.get("/v1/metrics", params={"service_name": "web-api", **params})
    assert error_fields(response) == [field]
    assert response.json()["detail"][0]["msg"] == "Value error, out of range once converted to UTC"
    assert_api_words(response)


async def test_the_extremes_that_convert_to_utc_are_served(api: Api) -> None:
    response = await api.client.get(
        "/v1/metrics",
        params={
            "service_name": "web-api",
            "start": "0001-01-01T00:00:00-14:00",
            "end": "9999-12-31T23:59:59+14:00",
        },
    )
    assert response.status_code == 200, response.text
    assert response.json() == []


async def test_a_value_the_database_refuses_is_a_generic_422(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refused(*args: Any, **kwargs: Any) -> Any:
        # A real refusal (SQLSTATE 22021), through the storage boundary's translation.
        async with connection(api.services.engine) as conn:
            await conn.execute(text("SELECT CAST(:value AS text)"), {"value": "a\x00b"})
        raise AssertionError("PostgreSQL accepted a NUL")

    monkeypatch.setattr(api.services.db, "list_backfill_jobs", refused)
    response = await api.client.get("/v1/backfill-jobs")
    assert response.status_code == 422, response.text
    assert response.json() == {
        "error": "invalid",
        "detail": [{"loc": ["request"], "msg": "a parameter holds a value that cannot be stored"}],
    }


async def test_the_routes_own_checks_still_name_their_field(api: Api) -> None:
    response = await api.client.get(
        "/v1/metrics", params={"service_name": "web-api", "interval": "hour"}
    )
    assert response.json() == {
        "error": "invalid",
        "detail": [{"loc": ["query", "metric_type"], "msg": "required with interval"}],
    }


async def test_a_dead_database_is_a_503_with_a_fixed_text(
    pubsub_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    dead = dataclasses.replace(
        pubsub_settings, database_url="postgresql+asyncpg://postgres@127.0.0.1:1/utxoiq"
    )
    async with app_client(dead, Services.create(dead, REGISTRY)) as client:
        responses = [
            await client.get("/v1/backfill-jobs"),
            await client.get(f"/v1/backfill-jobs/{uuid.uuid4()}"),
            await client.get("/v1/feedback/dead-db/stats"),
            await client.get("/v1/metrics", params={"service_name": "web-api"}),
        ]
    for response in responses:
        assert response.status_code == 503, response.text
        assert response.json() == {
            "error": "unavailable",
            "detail": "a dependency is unavailable; retry",
        }
    # The reason is in the log, with the path.
    failures = [r for r in caplog.records if r.getMessage() == "request failed"]
    assert len(failures) == len(responses)
    assert all(getattr(r, "error", "") and getattr(r, "path", "") for r in failures)
