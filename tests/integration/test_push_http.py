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
import logging
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.emulator import FAST_BATCH, drain_dead_letters, scalar
from tests.support.factories import metric_payload
from tests.support.oidc_tokens import (
    AUDIENCE,
    BAD_AUTH,
    SERVICE_ACCOUNT,
    CertSource,
    bearer,
    claims,
    sign_rs256,
    valid_authorization,
)
from tests.support.push import (
    PushServices,
    app_client,
    encoded,
    envelope,
    exchange,
    row_counts,
    served,
)
from tests.support.topics import REGISTRY
from worker.config import Settings
from worker.http.app import create_app
from worker.http.limits import MAX_HEAD_BYTES, HeadLimits
from worker.http.oidc import CertCache, CertsUnavailableError, PushVerifier
from worker.http.services import Services
from worker.pipeline.settings import BatchSettings
from worker.pubsub.client import PubSub
from worker.sources.push import MAX_PUSH_BODY_BYTES

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
    # Fixed details: the verifier's reasons (which may quote the token, the audience or
    # the identity) go to the log only.
    assert response.json() == (
        {"error": "unauthorized", "detail": "invalid or missing token"}
        if bad.status == 401
        else {"error": "forbidden", "detail": "identity may not push"}
    )
    await assert_nothing_written(engine, push)


async def test_a_huge_token_gets_a_small_401_that_does_not_quote_it(
    client: httpx.AsyncClient, engine: AsyncEngine, push: PushServices
) -> None:
    token = "eyJ" + "QUOTEME" * (1024 * 1024 // 7)
    response = await client.post(
        "/push/metrics",
        content=encoded(envelope(sample())),
        headers={"content-type": "application/json", "authorization": bearer(token)},
    )
    assert response.status_code == 401, response.text[:200]
    assert len(response.content) < 200
    assert b"QUOTEME" not in response.content
    await assert_nothing_written(engine, push)


async def test_refusals_name_neither_the_audience_nor_the_identity(
    client: httpx.AsyncClient,
) -> None:
    wrong_audience = await client.post(
        "/push/metrics",
        content=encoded(envelope(sample())),
        headers=headers(authorization=bearer(sign_rs256(claims(aud="https://other.example")))),
    )
    assert wrong_audience.status_code == 401, wrong_audience.text
    for configured_or_sent in ("other.example", AUDIENCE, "example.run.app"):
        assert configured_or_sent not in wrong_audience.text
    intruder = "intruder@evil.iam.gserviceaccount.com"
    wrong_identity = await client.post(
        "/push/metrics",
        content=encoded(envelope(sample())),
        headers=headers(authorization=bearer(sign_rs256(claims(email=intruder)))),
    )
    assert wrong_identity.status_code == 403, wrong_identity.text
    assert intruder not in wrong_identity.text and "evil" not in wrong_identity.text


async def unavailable_certs() -> tuple[Mapping[str, str], float]:
    raise CertsUnavailableError("certificates: HTTP 500")


@pytest.mark.parametrize("route", ["asgi-endpoint", "fastapi-route"])
async def test_certificates_unavailable_is_503_so_pubsub_retries(
    route: str,
    pubsub_settings: Settings,
    engine: AsyncEngine,
    push: PushServices,
    caplog: pytest.LogCaptureFixture,
) -> None:
    verifier = PushVerifier(AUDIENCE, [SERVICE_ACCOUNT], CertCache(fetch=unavailable_certs))
    fastapi_route = route == "fastapi-route"
    async with app_client(
        pubsub_settings, push.services, verifier, fastapi_route=fastapi_route
    ) as (http):
        with caplog.at_level(logging.WARNING, logger="worker.http.push_endpoint"):
            response = await http.post(
                "/push/metrics", content=encoded(envelope(sample())), headers=headers()
            )
    assert response.status_code == 503, response.text
    assert response.json() == {
        "error": "unavailable",
        "detail": "token verification unavailable; retry",
    }
    logged = [r for r in caplog.records if r.name == "worker.http.push_endpoint"]
    assert [r.getMessage() for r in logged] == ["push token not verified: certificates unavailable"]
    assert getattr(logged[0], "reason", "")
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


# -- limits on a served request: uvicorn as ``serve`` configures it -----------------------

HEAD_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0


@pytest.fixture
def port(pubsub_settings: Settings) -> Iterator[int]:
    """The app served on a socket, push auth off, with short head and body timeouts."""
    app = create_app(lambda: Services.create(pubsub_settings, REGISTRY), None)
    assert app.push_endpoint is not None
    app.push_endpoint.body_deadlines.timeout_s = BODY_TIMEOUT_S
    with served(app, HeadLimits(head_timeout_s=HEAD_TIMEOUT_S)) as serving:
        yield serving


def peak_rss_bytes() -> int:
    """This process's peak RSS (the server runs in one of its threads)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


async def endless_header(total_bytes: int) -> AsyncIterator[bytes]:
    yield (
        b"POST /push/metrics HTTP/1.1\r\nHost: worker\r\n"
        b"Content-Type: application/json\r\nAuthorization: Bearer "
    )
    piece = b"a" * 65536
    for _ in range(total_bytes // len(piece)):
        yield piece


async def test_a_header_over_the_limit_is_431_and_the_connection_closed(port: int) -> None:
    reset_peak_rss()
    before = peak_rss_bytes()
    result = await exchange(port, endless_header(64 * 1024 * 1024), wait_s=20)
    growth = peak_rss_bytes() - before
    assert result.statuses == [431], result.received[:300]
    assert result.body() == {
        "error": "headers_too_large",
        "detail": f"request line and headers over {MAX_HEAD_BYTES} bytes",
    }
    assert result.header("connection") == "close"
    assert result.closed_after_s is not None, "the connection was left open"
    assert growth < 8 * 1024 * 1024, f"peak RSS grew by {growth} bytes"


async def test_a_request_line_over_the_limit_is_431(port: int) -> None:
    url = b"/v1/feedback/" + b"x" * (2 * MAX_HEAD_BYTES) + b"/stats"
    result = await exchange(port, [b"GET " + url + b" HTTP/1.1\r\nHost: worker\r\n\r\n"], 10)
    assert result.statuses == [431], result.received[:300]
    assert result.closed_after_s is not None


@pytest.mark.parametrize("piece_bytes", [0, 4096, 65536, 200_000], ids=lambda n: f"pieces-{n}")
async def test_heads_under_the_limit_are_served_also_after_a_large_body(
    port: int, piece_bytes: int
) -> None:
    padding = b"".join(b"X-Pad-%d: %s\r\n" % (n, b"p" * 1000) for n in range(40))
    assert MAX_HEAD_BYTES // 2 < len(padding) < MAX_HEAD_BYTES - 1024
    healthz = b"GET /healthz HTTP/1.1\r\nHost: worker\r\n" + padding
    body = b"x" * (512 * 1024)
    # Pipelined: a body's end and the next heads share the server's reads, which end
    # anywhere (piece_bytes 0: one write).
    raw = (
        b"POST /push/no-such-topic HTTP/1.1\r\nHost: worker\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        % len(body)
        + body
        + healthz
        + b"\r\n"
        + healthz
        + b"Connection: close\r\n\r\n"
    )

    async def pieces() -> AsyncIterator[bytes]:
        size = piece_bytes or len(raw)
        for offset in range(0, len(raw), size):
            yield raw[offset : offset + size]
            await asyncio.sleep(0.001)

    result = await exchange(port, pieces(), wait_s=10, stop_when_answered=False)
    assert result.statuses == [404, 200, 200], result.received[:500]
    assert result.closed_after_s is not None


async def test_a_silent_connection_is_408_and_closed(port: int) -> None:
    result = await exchange(port, [], wait_s=10)
    assert result.statuses == [408], result.received
    assert result.body()["error"] == "request_timeout"
    assert result.closed_after_s is not None
    assert HEAD_TIMEOUT_S * 0.9 <= result.closed_after_s < HEAD_TIMEOUT_S + 2


async def test_a_trickled_head_is_408_and_closed(port: int) -> None:
    async def trickle() -> AsyncIterator[bytes]:
        for byte in b"GET /healthz HTTP/1.1\r\nHost: worker\r\nX-Slow: " + b"s" * 1000:
            yield bytes([byte])
            await asyncio.sleep(0.05)

    result = await exchange(port, trickle(), wait_s=10)
    assert result.statuses == [408], result.received
    assert result.closed_after_s is not None
    assert result.closed_after_s < HEAD_TIMEOUT_S + 2


async def test_an_idle_keep_alive_connection_outlives_the_head_timeout(port: int) -> None:
    async def two_requests() -> AsyncIterator[bytes]:
        yield b"GET /healthz HTTP/1.1\r\nHost: worker\r\n\r\n"
        # Idle between requests is keep-alive's business (5 s), not the head timeout's.
        await asyncio.sleep(HEAD_TIMEOUT_S * 2)
        yield b"GET /healthz HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n\r\n"

    result = await exchange(port, two_requests(), wait_s=10, stop_when_answered=False)
    assert result.statuses == [200, 200], result.received
    assert result.closed_after_s is not None


async def test_a_body_that_never_arrives_is_408_and_closed(port: int) -> None:
    head = (
        b"POST /push/metrics HTTP/1.1\r\nHost: worker\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
    )
    result = await exchange(port, [head], wait_s=10)
    assert result.statuses == [408], result.received
    assert result.body() == {
        "error": "request_timeout",
        "detail": f"body not received within {BODY_TIMEOUT_S:g} s",
    }
    assert result.header("connection") == "close"
    assert result.closed_after_s is not None
    assert BODY_TIMEOUT_S * 0.9 <= result.closed_after_s < BODY_TIMEOUT_S + 2
