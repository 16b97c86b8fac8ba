"""OIDC verification of push requests (CONTRACT.md, HTTP), without a network.

Keys are generated here and a fake certificate endpoint serves their certificate;
every wrong or forged token must raise ``AuthError`` (401) or ``ForbiddenError`` (403).
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from tests.support.oidc_tokens import (
    AUDIENCE,
    BAD_AUTH,
    KEY_ID,
    SERVICE_ACCOUNT,
    CertSource,
    Clock,
    bearer,
    certificate_pem,
    claims,
    private_key,
    public_key_pem,
    sign_rs256,
    valid_authorization,
)
from worker.config import Settings
from worker.exceptions import WorkerError
from worker.http import oidc
from worker.http.app import push_verifier
from worker.http.oidc import (
    CERTS_RETRY_AFTER_S,
    CLOCK_SKEW_S,
    AuthError,
    CertCache,
    CertsUnavailableError,
    ForbiddenError,
    PushVerifier,
)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    return Clock().install(monkeypatch)


@pytest.fixture
def source() -> CertSource:
    return CertSource()


@pytest.fixture
def verifier(source: CertSource, clock: Clock) -> PushVerifier:
    return PushVerifier(AUDIENCE, [SERVICE_ACCOUNT], CertCache(fetch=source.fetch))


async def test_a_valid_token_passes(verifier: PushVerifier) -> None:
    identity = await verifier.verify(valid_authorization())
    assert identity.email == SERVICE_ACCOUNT
    assert identity.subject == "1234567890"


async def test_the_scheme_is_case_insensitive(verifier: PushVerifier) -> None:
    identity = await verifier.verify("bearer " + valid_authorization().split(" ", 1)[1])
    assert identity.email == SERVICE_ACCOUNT


async def test_a_public_key_pem_in_the_cert_set_also_verifies(clock: Clock) -> None:
    source = CertSource(certs={KEY_ID: public_key_pem(private_key("google"))})
    verifier = PushVerifier(AUDIENCE, [SERVICE_ACCOUNT], CertCache(fetch=source.fetch))
    assert (await verifier.verify(valid_authorization())).email == SERVICE_ACCOUNT


async def test_any_listed_service_account_may_push(source: CertSource, clock: Clock) -> None:
    other = "scheduler@utxoiq-test.iam.gserviceaccount.com"
    verifier = PushVerifier(AUDIENCE, [SERVICE_ACCOUNT, other], CertCache(fetch=source.fetch))
    identity = await verifier.verify(bearer(sign_rs256(claims(email=other))))
    assert identity.email == other


@pytest.mark.parametrize("case", sorted(BAD_AUTH))
async def test_a_bad_token_is_refused(case: str, verifier: PushVerifier) -> None:
    bad = BAD_AUTH[case]
    expected = AuthError if bad.status == 401 else ForbiddenError
    with pytest.raises(expected):
        await verifier.verify(bad.header())


# -- the certificate cache --------------------------------------------------------------


async def test_certs_are_fetched_once_for_many_verifications(
    source: CertSource, verifier: PushVerifier, clock: Clock
) -> None:
    for _ in range(20):
        await verifier.verify(valid_authorization())
        clock.advance(10)  # 200 s in all, within the TTL
    await asyncio.gather(*(verifier.verify(valid_authorization()) for _ in range(50)))
    assert source.fetches == 1


async def test_concurrent_first_verifications_share_one_fetch(
    source: CertSource, verifier: PushVerifier
) -> None:
    await asyncio.gather(*(verifier.verify(valid_authorization()) for _ in range(50)))
    assert source.fetches == 1


async def test_an_unknown_kid_refetches_at_most_once_a_minute(
    source: CertSource, verifier: PushVerifier, clock: Clock
) -> None:
    forged = BAD_AUTH["unknown_kid"].header
    await verifier.verify(valid_authorization())
    assert source.fetches == 1
    clock.advance(30)
    for _ in range(10):  # a flood of unknown kids within the minute: no refetch
        with pytest.raises(AuthError):
            await verifier.verify(forged())
        clock.advance(2)
    assert source.fetches == 1
    clock.advance(10)  # 60 s after the fetch
    with pytest.raises(AuthError):
        await verifier.verify(forged())
    assert source.fetches == 2
    clock.advance(59)
    with pytest.raises(AuthError):
        await verifier.verify(forged())
    assert source.fetches == 2
    # Valid tokens are unaffected by the flood.
    await verifier.verify(valid_authorization())
    assert source.fetches == 2


async def test_a_concurrent_flood_of_unknown_kids_refetches_once(
    source: CertSource, verifier: PushVerifier, clock: Clock
) -> None:
    await verifier.verify(valid_authorization())
    clock.advance(61)
    forged = BAD_AUTH["unknown_kid"].header
    results = await asyncio.gather(
        *(verifier.verify(forged()) for _ in range(30)), return_exceptions=True
    )
    assert all(isinstance(r, AuthError) for r in results), results
    assert source.fetches == 2


async def test_a_rotated_key_is_picked_up_by_the_refetch(
    source: CertSource, verifier: PushVerifier, clock: Clock
) -> None:
    await verifier.verify(valid_authorization())
    source.certs = {**source.certs, "test-key-2": certificate_pem(private_key("rotated"))}
    rotated = bearer(sign_rs256(claims(), private_key("rotated"), key_id="test-key-2"))
    clock.advance(61)
    identity = await verifier.verify(rotated)
    assert identity.email == SERVICE_ACCOUNT
    assert source.fetches == 2


async def test_certs_are_refetched_after_their_ttl(clock: Clock) -> None:
    source = CertSource(ttl_s=300)
    verifier = PushVerifier(AUDIENCE, [SERVICE_ACCOUNT], CertCache(fetch=source.fetch))
    await verifier.verify(valid_authorization())
    clock.advance(299)
    await verifier.verify(valid_authorization())
    assert source.fetches == 1
    clock.advance(2)
    await verifier.verify(valid_authorization())
    assert source.fetches == 2
    clock.advance(299)
    await verifier.verify(valid_authorization())
    assert source.fetches == 2


async def test_a_removed_key_stops_verifying_after_the_ttl(clock: Clock) -> None:
    source = CertSource(ttl_s=300)
    verifier = PushVerifier(AUDIENCE, [SERVICE_ACCOUNT], CertCache(fetch=source.fetch))
    await verifier.verify(valid_authorization())
    source.certs = {"test-key-2": certificate_pem(private_key("rotated"))}
    clock.advance(301)
    with pytest.raises(AuthError):
        await verifier.verify(valid_authorization())


async def test_unavailable_certs_are_transient_and_retried(clock: Clock) -> None:
    source = CertSource(failure=CertsUnavailableError("certificates: HTTP 500"))
    verifier = PushVerifier(AUDIENCE, [SERVICE_ACCOUNT], CertCache(fetch=source.fetch))
    with pytest.raises(CertsUnavailableError) as raised:
        await verifier.verify(valid_authorization())
    assert isinstance(raised.value, WorkerError) and raised.value.transient
    source.failure = None
    clock.advance(CERTS_RETRY_AFTER_S)
    assert (await verifier.verify(valid_authorization())).email == SERVICE_ACCOUNT
    assert source.fetches == 2


# -- nbf ----------------------------------------------------------------------------------


async def test_a_past_nbf_is_accepted(verifier: PushVerifier) -> None:
    token = sign_rs256(claims(nbf=int(time.time()) - 60))
    assert (await verifier.verify(bearer(token))).email == SERVICE_ACCOUNT


async def test_an_nbf_within_the_clock_skew_is_accepted(verifier: PushVerifier) -> None:
    token = sign_rs256(claims(nbf=int(time.time()) + CLOCK_SKEW_S - 3))
    assert (await verifier.verify(bearer(token))).email == SERVICE_ACCOUNT


async def test_a_future_nbf_is_refused_as_not_yet_valid(verifier: PushVerifier) -> None:
    with pytest.raises(AuthError, match=r"^token not yet valid$"):
        await verifier.verify(BAD_AUTH["not_yet_valid"].header())


# -- what a refusal tells the client ------------------------------------------------------

CLIENT_SAFE_MESSAGES = {
    "no Authorization header",
    "Authorization is not a Bearer token",
    "invalid token",
    "token not yet valid",
    "identity may not push",
}


@pytest.mark.parametrize("case", sorted(BAD_AUTH))
async def test_a_refusal_echoes_nothing_and_names_no_configuration(
    case: str, verifier: PushVerifier, caplog: pytest.LogCaptureFixture
) -> None:
    header = BAD_AUTH[case].header()
    token = (header or "").partition(" ")[2].strip()
    with (
        caplog.at_level(logging.INFO, logger="worker.http.oidc"),
        pytest.raises((AuthError, ForbiddenError)) as raised,
    ):
        await verifier.verify(header)
    message = str(raised.value)
    assert message in CLIENT_SAFE_MESSAGES
    assert AUDIENCE not in message and SERVICE_ACCOUNT not in message
    assert "@" not in message
    if len(token) > 16:
        assert token not in message
    # The detail is logged once, cut short, and never holds the token.
    refusals = [r for r in caplog.records if r.name == "worker.http.oidc"]
    assert len(refusals) == 1
    (record,) = refusals
    assert record.levelno == logging.INFO
    assert record.__dict__["auth_status"] == BAD_AUTH[case].status
    detail = record.__dict__["auth_detail"]
    assert isinstance(detail, str)
    assert len(detail) <= oidc.MAX_LOGGED_CHARS + 3
    if len(token) > 16:
        assert token not in record.getMessage() and token not in detail


async def test_a_megabyte_of_garbage_gets_a_short_fixed_answer(
    verifier: PushVerifier, caplog: pytest.LogCaptureFixture
) -> None:
    for garbage in ("x" * 2**20, ".".join(["eyJ" + "A" * 2**18] * 3), "a." * 2**19):
        with (
            caplog.at_level(logging.INFO, logger="worker.http.oidc"),
            pytest.raises(AuthError) as raised,
        ):
            await verifier.verify(bearer(garbage))
        assert str(raised.value) == "invalid token"
    logged = "".join(r.getMessage() + str(r.__dict__.get("auth_detail")) for r in caplog.records)
    assert len(logged) < 1000


async def test_a_wrong_audience_does_not_name_the_expected_one(verifier: PushVerifier) -> None:
    with pytest.raises(AuthError) as raised:
        await verifier.verify(BAD_AUTH["wrong_audience"].header())
    assert str(raised.value) == "invalid token"
    assert AUDIENCE not in str(raised.value) and "other.example" not in str(raised.value)


async def test_a_forbidden_identity_is_not_named(verifier: PushVerifier) -> None:
    for case in ("wrong_email", "email_verified_false"):
        with pytest.raises(ForbiddenError) as raised:
            await verifier.verify(BAD_AUTH[case].header())
        assert str(raised.value) == "identity may not push"


# -- configuration ----------------------------------------------------------------------


def test_push_auth_disabled_needs_no_verifier() -> None:
    assert push_verifier(Settings(push_auth="disabled")) is None


def test_push_auth_required_needs_an_audience() -> None:
    with pytest.raises(ValueError, match="PUSH_AUDIENCE"):
        push_verifier(Settings(push_auth="required", push_service_accounts=(SERVICE_ACCOUNT,)))


def test_push_auth_required_needs_service_accounts() -> None:
    with pytest.raises(ValueError, match="PUSH_SERVICE_ACCOUNTS"):
        push_verifier(Settings(push_auth="required", push_audience=AUDIENCE))


def test_push_auth_required_builds_a_verifier() -> None:
    settings = Settings(
        push_auth="required", push_audience=AUDIENCE, push_service_accounts=(SERVICE_ACCOUNT,)
    )
    verifier = push_verifier(settings)
    assert verifier is not None
    assert verifier.audience == AUDIENCE
    assert verifier.service_accounts == {SERVICE_ACCOUNT}
