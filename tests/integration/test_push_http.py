"""``POST /push/{topic}`` in-process (CONTRACT.md, HTTP): the app in this event loop,
real PostgreSQL, Redis and Pub/Sub emulator behind it.

Each refusal is checked twice: the status code, and that nothing was written (the
database is unchanged and the pipeline received nothing). A request that got through
by mistake would have been answered only after its commit, so "nothing written" is
checked right after the response.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.emulator import FAST_BATCH, drain_dead_letters, scalar
from tests.factories import metric_payload
from tests.integration.push_fixtures import (
    PushServices,
    app_client,
    encoded,
    envelope,
    row_counts,
)
from tests.oidc_tokens import (
    AUDIENCE,
    BAD_AUTH,
    SERVICE_ACCOUNT,
    CertSource,
    valid_authorization,
)
from worker.config import Settings
from worker.oidc import CertCache, PushVerifier
from worker.pipeline import BatchSettings
from worker.pubsub import PubSub
from worker.push import MAX_PUSH_BODY_BYTES

NOTHING = {"system_metrics": 0, "insight_feedback": 0, "backfill_jobs": 0}
DEAD_DATABASE_URL = "postgresql+asyncpg://postgres@127.0.0.1:1/utxoiq"


def sample(**changes: Any) -> dict[str, Any]:
    return metric_payload(event_id=str(uuid.uuid4()), **changes)


def headers(**extra: str) -> dict[str, str]:
    return {"content-type": "application/json", "authorization": valid_authorization(), **extra}


@pytest.fixture
def push(pubsub_settings: Settings) -> PushServices:
    return PushServices(pubsub_settings, FAST_BATCH)


@pytest_asyncio.fixture(loop_scope="session", params=["asgi-endpoint", "fastapi-route"])
async def client(
    request: pytest.FixtureRequest, pubsub_settings: Settings, push: PushServices
) -> AsyncIterator[httpx.AsyncClient]:
    """The app with OIDC required, verified against a local fake of Google's certs; the
    push answered by the ASGI-level endpoint (as served) or by the documenting route."""
    verifier = PushVerifier(AUDIENCE, [SERVICE_ACCOUNT], CertCache(fetch=CertSource().fetch))
    route = request.param == "fastapi-route"
    async with app_client(pubsub_settings, push.services, verifier, fastapi_route=route) as http:
        yield http


async def assert_nothing_written(engine: AsyncEngine, push: PushServices) -> None:
    assert await row_counts(engine) == NOTHING
    assert push.counter("received", "metrics") == 0


# -- authentication ---------------------------------------------------------------------


async def test_a_valid_token_commits_the_row_before_204(
    client: httpx.AsyncClient, engine: AsyncEngine, push: PushServices
) -> None:
    payload = sample()
    response = await client.post(
        "/push/metrics", content=encoded(envelope(payload)), headers=headers()
    )
    assert response.status_code == 204, response.text
    stored = await scalar(
        engine, "SELECT id::text FROM system_metrics WHERE id = :id", id=payload["event_id"]
    )
    assert stored == payload["event_id"]
    assert push.counter("committed", "metrics") == 1


@pytest.mark.parametrize("case", sorted(BAD_AUTH))
async def test_a_bad_token_is_refused_and_nothing_is_written(
    case: str, client: httpx.AsyncClient, engine: AsyncEngine, push: PushServices
) -> None:
    bad = BAD_AUTH[case]
    authorization = bad.header()
    sent = {"content-type": "application/json"}
    if authorization is not None:
        sent["authorization"] = authorization
    response = await client.post("/push/metrics", content=encoded(envelope(sample())), headers=sent)
    assert response.status_code == bad.status, response.text
    assert response.json()["error"] == ("unauthorized" if bad.status == 401 else "forbidden")
    await assert_nothing_written(engine, push)


# -- the envelope -----------------------------------------------------------------------


async def test_the_emulators_envelope_is_accepted_and_a_redelivery_is_one_row(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    # The emulator's spelling: message_id, publish_time, no deliveryAttempt.
    body = encoded(envelope(sample(), snake_case=True, message_id="42"))
    for _ in range(3):
        response = await client.post("/push/metrics", content=body, headers=headers())
        assert response.status_code == 204, response.text
    assert await row_counts(engine) == {**NOTHING, "system_metrics": 1}


async def test_a_charset_parameter_is_still_json(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    response = await client.post(
        "/push/metrics",
        content=encoded(envelope(sample())),
        headers=headers(**{"content-type": "Application/JSON; charset=utf-8"}),
    )
    assert response.status_code == 204, response.text
    assert (await row_counts(engine))["system_metrics"] == 1


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "application/jsonx"]
)
async def test_not_json_is_415(
    content_type: str | None, client: httpx.AsyncClient, engine: AsyncEngine, push: PushServices
) -> None:
    sent = {"authorization": valid_authorization()}
    if content_type is not None:
        sent["content-type"] = content_type
    response = await client.post("/push/metrics", content=encoded(envelope(sample())), headers=sent)
    assert response.status_code == 415, response.text
    await assert_nothing_written(engine, push)


NOT_ENVELOPES: dict[str, bytes] = {
    "not_json": b"{not json",
    "empty": b"",
    "a_list": b"[]",
    "a_string": b'"message"',
    "no_message": encoded({"subscription": "projects/p/subscriptions/s"}),
    "message_not_object": encoded({"message": "aGVsbG8="}),
    "no_message_id": encoded({"message": {"data": "e30="}}),
    "empty_message_id": encoded({"message": {"data": "e30=", "messageId": ""}}),
    "numeric_message_id": encoded({"message": {"data": "e30=", "messageId": 7}}),
    "data_not_string": encoded({"message": {"data": 5, "messageId": "1"}}),
    "attributes_not_strings": encoded(
        {"message": {"data": "e30=", "messageId": "1", "attributes": {"a": 1}}}
    ),
    "attributes_a_list": encoded(
        {"message": {"data": "e30=", "messageId": "1", "attributes": ["a"]}}
    ),
    "publish_time_not_rfc3339": encoded(
        {"message": {"data": "e30=", "messageId": "1", "publishTime": "yesterday"}}
    ),
}


@pytest.mark.parametrize("case", sorted(NOT_ENVELOPES))
async def test_a_body_that_is_not_an_envelope_is_400(
    case: str, client: httpx.AsyncClient, engine: AsyncEngine, push: PushServices
) -> None:
    response = await client.post("/push/metrics", content=NOT_ENVELOPES[case], headers=headers())
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "bad_request"
    await assert_nothing_written(engine, push)


async def test_an_unknown_topic_is_404(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    response = await client.post(
        "/push/no-such-topic", content=encoded(envelope(sample())), headers=headers()
    )
    assert response.status_code == 404, response.text
    assert await row_counts(engine) == NOTHING


# -- size cap ---------------------------------------------------------------------------


def oversized_envelope() -> bytes:
    """A valid envelope padded past 16 MiB: applied if the cap were not enforced."""
    body = envelope(sample())
    body["padding"] = "x" * MAX_PUSH_BODY_BYTES
    raw = encoded(body)
    assert len(raw) > MAX_PUSH_BODY_BYTES
    return raw


def chunks(raw: bytes, size: int = 1024 * 1024) -> Iterator[bytes]:
    for i in range(0, len(raw), size):
        yield raw[i : i + size]


async def stream(raw: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks(raw):
        yield chunk


async def test_a_body_over_16_mib_is_413(
    client: httpx.AsyncClient, engine: AsyncEngine, push: PushServices
) -> None:
    response = await client.post("/push/metrics", content=oversized_envelope(), headers=headers())
    assert response.status_code == 413, response.text
    await assert_nothing_written(engine, push)


async def test_a_streamed_body_over_16_mib_without_length_is_413(
    client: httpx.AsyncClient, engine: AsyncEngine, push: PushServices
) -> None:
    response = await client.post(
        "/push/metrics", content=stream(oversized_envelope()), headers=headers()
    )
    assert "content-length" not in response.request.headers
    assert response.status_code == 413, response.text
    await assert_nothing_written(engine, push)


async def test_a_lying_small_content_length_does_not_lift_the_cap(
    client: httpx.AsyncClient, engine: AsyncEngine, push: PushServices
) -> None:
    response = await client.post(
        "/push/metrics",
        content=stream(oversized_envelope()),
        headers=headers(**{"content-length": "1000"}),
    )
    assert response.request.headers["content-length"] == "1000"
    assert response.status_code == 413, response.text
    await assert_nothing_written(engine, push)


async def test_a_body_just_under_the_cap_is_read(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    body = envelope(sample())
    raw = encoded(body)
    body["padding"] = "x" * (MAX_PUSH_BODY_BYTES - len(raw) - len(', "padding": ""'))
    raw = encoded(body)
    assert len(raw) == MAX_PUSH_BODY_BYTES
    response = await client.post("/push/metrics", content=stream(raw), headers=headers())
    assert response.status_code == 204, response.text
    assert (await row_counts(engine))["system_metrics"] == 1


# -- messages that can never apply: 204 and dead-lettered ---------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ("not base64 at all!", "invalid_encoding"),
        ("e30", "invalid_encoding"),  # unpadded: strict base64 refuses it
        (b"\xff\xfe not utf-8", "invalid_encoding"),
        (b'{"service_name": ', "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b'{"metric_value": NaN}', "invalid_json"),
        (encoded(metric_payload(metric_value="high")), "schema_violation"),
    ],
    ids=[
        "not_base64",
        "unpadded_base64",
        "not_utf8",
        "truncated_json",
        "json_not_object",
        "nan",
        "schema_violation",
    ],
)
async def test_a_message_that_can_never_apply_is_dead_lettered_and_204(
    data: bytes | str,
    reason: str,
    client: httpx.AsyncClient,
    engine: AsyncEngine,
    pubsub: PubSub,
    push: PushServices,
) -> None:
    body = envelope(
        data,
        message_id="1001",
        attributes={"origin": "test"},
        subscription=f"projects/{pubsub.project}/subscriptions/metrics-worker",
    )
    response = await client.post("/push/metrics", content=encoded(body), headers=headers())
    assert response.status_code == 204, response.text
    assert await row_counts(engine) == NOTHING
    letters = await drain_dead_letters(pubsub, "metrics", expected=1)
    assert len(letters) == 1, letters
    letter = letters[0]
    # Data unchanged: the bytes as published (or, not being base64, as received).
    assert letter.data == (data if isinstance(data, bytes) else data.encode("utf-8"))
    assert letter.attributes["dead_letter_reason"] == reason
    assert letter.attributes["origin"] == "test"
    assert letter.attributes["source_topic"] == "metrics"
    assert letter.attributes["source_subscription"] == "metrics-worker"
    assert letter.attributes["source_message_id"] == "1001"
    assert letter.attributes["dead_letter_detail"]
    assert push.counter("dead_lettered", "metrics") == 1


async def test_one_bad_message_does_not_hold_back_good_ones(
    client: httpx.AsyncClient, engine: AsyncEngine, pubsub: PubSub
) -> None:
    good = [encoded(envelope(sample())) for _ in range(20)]
    bad = [encoded(envelope(b"{oops")) for _ in range(3)]
    responses = await asyncio.gather(
        *(client.post("/push/metrics", content=b, headers=headers()) for b in good + bad)
    )
    assert [r.status_code for r in responses] == [204] * 23
    assert (await row_counts(engine))["system_metrics"] == 20
    letters = await drain_dead_letters(pubsub, "metrics", expected=3)
    assert sorted(m.attributes["dead_letter_reason"] for m in letters) == ["invalid_json"] * 3


# -- coalescing -------------------------------------------------------------------------


async def test_concurrent_pushes_are_coalesced_into_few_batches(
    pubsub_settings: Settings, engine: AsyncEngine
) -> None:
    push = PushServices(pubsub_settings, BatchSettings(max_batch_delay_ms=50))
    requests = 200
    bodies = [encoded(envelope(sample(metric_value=float(i)))) for i in range(requests)]
    async with app_client(pubsub_settings, push.services) as http:
        responses = await asyncio.gather(
            *(
                http.post("/push/metrics", content=b, headers={"content-type": "application/json"})
                for b in bodies
            )
        )
        assert [r.status_code for r in responses] == [204] * requests
        assert (await row_counts(engine))["system_metrics"] == requests
        assert push.counter("committed", "metrics") == requests
        batches = push.batches("metrics")
    # One transaction per request would be 200 batches; coalescing gives a handful.
    assert 1 <= batches <= requests // 10, batches


# -- transient failures and readiness -----------------------------------------------------


async def test_a_dead_database_is_503_so_pubsub_retries(
    pubsub_settings: Settings, pubsub: PubSub
) -> None:
    dead = dataclasses.replace(pubsub_settings, database_url=DEAD_DATABASE_URL)
    push = PushServices(dead, FAST_BATCH)
    async with app_client(dead, push.services) as http:
        response = await http.post(
            "/push/metrics",
            content=encoded(envelope(sample())),
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "unavailable"
        assert push.counter("nacked", "metrics") == 1
        assert push.counter("dead_lettered", "metrics") == 0
    # Transient: never dead-lettered by the worker.
    assert await drain_dead_letters(pubsub, "metrics", quiet_s=0.5) == []


async def test_readyz_is_200_when_everything_answers(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "status": "ready",
        "checks": {"database": True, "redis": True, "pubsub": True},
    }
    assert (await client.get("/healthz")).json() == {"status": "ok"}


async def test_readyz_is_503_when_the_database_is_unreachable(
    pubsub_settings: Settings,
) -> None:
    dead = dataclasses.replace(pubsub_settings, database_url=DEAD_DATABASE_URL)
    async with app_client(dead, PushServices(dead).services) as http:
        response = await http.get("/readyz")
        assert response.status_code == 503, response.text
        assert response.json()["checks"] == {"database": False, "redis": True, "pubsub": True}
        # Alive all the same.
        assert (await http.get("/healthz")).status_code == 200
