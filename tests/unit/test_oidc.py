"""OIDC verification of push requests (CONTRACT.md, HTTP), without a network.

Keys are generated here and a fake certificate endpoint serves their certificate;
every wrong or forged token must raise ``AuthError`` (401) or ``ForbiddenError`` (403).
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from tests.oidc_tokens import (
    AUDIENCE,
    BAD_AUTH,
    KEY_ID,
    SERVICE_ACCOUNT,
    CertSource,
    bearer,
    certificate_pem,
    claims,
    private_key,
    public_key_pem,
    sign_rs256,
    valid_authorization,
)
from worker import oidc
from worker.api import push_verifier
from worker.config import Settings
from worker.exceptions import WorkerError
from worker.oidc import AuthError, CertCache, CertsUnavailableError, ForbiddenError, PushVerifier


class Clock:
    """Stands in for ``time.monotonic`` inside ``worker.oidc`` only."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    # Replace the module's reference only: the event loop keeps the real clock.
    monkeypatch.setattr(oidc, "time", SimpleNamespace(monotonic=fake.monotonic))
    return fake


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
    source = CertSource()
    failing = True

    async def fetch() -> tuple[dict[str, str], float]:
        if failing:
            raise CertsUnavailableError("certificates: HTTP 500")
        certs, ttl_s = await source.fetch()
        return dict(certs), ttl_s

    verifier = PushVerifier(AUDIENCE, [SERVICE_ACCOUNT], CertCache(fetch=fetch))
    with pytest.raises(CertsUnavailableError) as raised:
        await verifier.verify(valid_authorization())
    assert isinstance(raised.value, WorkerError) and raised.value.transient
    failing = False
    assert (await verifier.verify(valid_authorization())).email == SERVICE_ACCOUNT


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
