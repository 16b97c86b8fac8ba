"""Google-style OIDC tokens minted locally: RSA keys, a self-signed certificate, and
every forged or wrong token the push endpoint must refuse.

No network: ``CertSource.fetch`` stands in for Google's certificate endpoint (inject it as
``CertCache(fetch=...)``). Tokens are built by hand (base64url JSON, RS256 through
``cryptography``) so that broken ones (``alg: none``, HS256 with the public key as the
HMAC secret, a tampered payload) can be made as easily as good ones. ``CertSource``
can also fail or hang like an outage, and ``Clock`` stands in for the module's clock.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from worker.http import oidc

AUDIENCE = "https://utxoiq-worker.example.run.app/push"
SERVICE_ACCOUNT = "pubsub-push@utxoiq-test.iam.gserviceaccount.com"
ISSUER = "https://accounts.google.com"
KEY_ID = "test-key-1"


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def segment(value: Any) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode("utf-8"))


@functools.cache
def private_key(name: str) -> rsa.RSAPrivateKey:
    """A 2048-bit RSA key per name, generated once per process."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_key_pem(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


def certificate_pem(key: rsa.RSAPrivateKey) -> str:
    """A self-signed X.509 certificate of ``key`` (what Google's v1 certs endpoint serves)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test.googleusercontent.com")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def claims(**changes: Any) -> dict[str, Any]:
    """Valid claims of a Pub/Sub push token; ``None`` removes a claim."""
    now = int(time.time())
    values: dict[str, Any] = {
        "aud": AUDIENCE,
        "azp": "1234567890",
        "email": SERVICE_ACCOUNT,
        "email_verified": True,
        "exp": now + 3600,
        "iat": now,
        "iss": ISSUER,
        "sub": "1234567890",
    }
    values.update(changes)
    return {k: v for k, v in values.items() if v is not None}


def sign_rs256(
    payload: Mapping[str, Any],
    key: rsa.RSAPrivateKey | None = None,
    key_id: str | None = KEY_ID,
    **header: Any,
) -> str:
    head: dict[str, Any] = {"alg": "RS256", "typ": "JWT", **header}
    if key_id is not None:
        head["kid"] = key_id
    signed = f"{segment(head)}.{segment(dict(payload))}"
    signature = (key or private_key("google")).sign(
        signed.encode("ascii"), padding.PKCS1v15(), hashes.SHA256()
    )
    return f"{signed}.{b64url(signature)}"


def sign_hs256(payload: Mapping[str, Any], secret: bytes, key_id: str = KEY_ID) -> str:
    """The algorithm-confusion attack: HMAC keyed with bytes the verifier holds."""
    signed = f"{segment({'alg': 'HS256', 'typ': 'JWT', 'kid': key_id})}.{segment(dict(payload))}"
    mac = hmac.new(secret, signed.encode("ascii"), hashlib.sha256).digest()
    return f"{signed}.{b64url(mac)}"


def unsigned(payload: Mapping[str, Any], key_id: str = KEY_ID) -> str:
    return f"{segment({'alg': 'none', 'typ': 'JWT', 'kid': key_id})}.{segment(dict(payload))}."


def tampered(payload_changes: Mapping[str, Any]) -> str:
    """A valid token whose payload was swapped after signing (signature kept)."""
    head, _, signature = sign_rs256(claims()).split(".")
    return f"{head}.{segment(claims(**payload_changes))}.{signature}"


def google_certs() -> dict[str, str]:
    """The certificate set ``CertSource.fetch`` serves: our signing key's certificate."""
    return {KEY_ID: certificate_pem(private_key("google"))}


@dataclass
class CertSource:
    """A fake of Google's certificate endpoint: counts fetches; ``certs`` may change.

    An outage is ``failure`` (raised by every fetch while set) or ``hang`` (every
    fetch waits until cancelled, like an endpoint that never answers).
    """

    certs: dict[str, str] = field(default_factory=google_certs)
    ttl_s: float = 3600.0
    fetches: int = 0
    failure: BaseException | None = None
    hang: bool = False

    async def fetch(self) -> tuple[Mapping[str, str], float]:
        self.fetches += 1
        # The real fetch runs in a thread: other requests run while it is in flight.
        await asyncio.sleep(0)
        if self.hang:
            await asyncio.Event().wait()
        if self.failure is not None:
            raise self.failure
        return dict(self.certs), self.ttl_s


class Clock:
    """Stands in for ``time.monotonic`` inside ``worker.http.oidc`` (see ``install``)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def install(self, monkeypatch: pytest.MonkeyPatch) -> Clock:
        # Replace the module's reference only: the event loop keeps the real clock.
        monkeypatch.setattr(oidc, "time", SimpleNamespace(monotonic=self.monotonic))
        return self


def bearer(token: str) -> str:
    return f"Bearer {token}"


@dataclass(frozen=True)
class BadAuth:
    """An ``Authorization`` header value (None: no header) and the status it must get."""

    header: Callable[[], str | None]
    status: int  # 401: AuthError, 403: ForbiddenError


BAD_AUTH: dict[str, BadAuth] = {
    "wrong_audience": BadAuth(lambda: bearer(sign_rs256(claims(aud="https://other.example"))), 401),
    "wrong_issuer": BadAuth(lambda: bearer(sign_rs256(claims(iss="https://evil.example"))), 401),
    "expired": BadAuth(
        lambda: bearer(
            sign_rs256(claims(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600))
        ),
        401,
    ),
    "issued_in_the_future": BadAuth(
        lambda: bearer(
            sign_rs256(claims(iat=int(time.time()) + 3600, exp=int(time.time()) + 7200))
        ),
        401,
    ),
    "no_exp": BadAuth(lambda: bearer(sign_rs256(claims(exp=None))), 401),
    "not_yet_valid": BadAuth(lambda: bearer(sign_rs256(claims(nbf=int(time.time()) + 3600))), 401),
    "nbf_beyond_the_skew": BadAuth(
        lambda: bearer(sign_rs256(claims(nbf=int(time.time()) + oidc.CLOCK_SKEW_S + 30))), 401
    ),
    "nbf_a_string": BadAuth(lambda: bearer(sign_rs256(claims(nbf="0"))), 401),
    "nbf_a_bool": BadAuth(lambda: bearer(sign_rs256(claims(nbf=False))), 401),
    "nbf_infinite": BadAuth(lambda: bearer(sign_rs256(claims(nbf=float("inf")))), 401),
    "nbf_nan": BadAuth(lambda: bearer(sign_rs256(claims(nbf=float("nan")))), 401),
    "wrong_email": BadAuth(
        lambda: bearer(sign_rs256(claims(email="intruder@evil.iam.gserviceaccount.com"))), 403
    ),
    "no_email": BadAuth(lambda: bearer(sign_rs256(claims(email=None))), 403),
    "email_verified_false": BadAuth(lambda: bearer(sign_rs256(claims(email_verified=False))), 403),
    "email_verified_string": BadAuth(
        lambda: bearer(sign_rs256(claims(email_verified="true"))), 403
    ),
    "alg_none": BadAuth(lambda: bearer(unsigned(claims())), 401),
    "hs256_with_certificate": BadAuth(
        lambda: bearer(sign_hs256(claims(), google_certs()[KEY_ID].encode("ascii"))), 401
    ),
    "hs256_with_public_key": BadAuth(
        lambda: bearer(sign_hs256(claims(), public_key_pem(private_key("google")).encode("ascii"))),
        401,
    ),
    "tampered_payload": BadAuth(
        lambda: bearer(tampered({"email": "intruder@evil.iam.gserviceaccount.com"})), 401
    ),
    "unknown_kid": BadAuth(lambda: bearer(sign_rs256(claims(), key_id="unknown-kid")), 401),
    "other_key_same_kid": BadAuth(lambda: bearer(sign_rs256(claims(), private_key("other"))), 401),
    "no_kid_other_key": BadAuth(
        lambda: bearer(sign_rs256(claims(), private_key("other"), key_id=None)), 401
    ),
    "no_header": BadAuth(lambda: None, 401),
    "empty_header": BadAuth(lambda: "", 401),
    "basic_scheme": BadAuth(lambda: "Basic cHVzaDpzZWNyZXQ=", 401),
    "token_scheme": BadAuth(lambda: f"Token {sign_rs256(claims())}", 401),
    "bearer_without_token": BadAuth(lambda: "Bearer ", 401),
    "not_a_jwt": BadAuth(lambda: "Bearer not-a-jwt", 401),
    "garbage_segments": BadAuth(lambda: "Bearer a.b.c", 401),
    "header_not_object": BadAuth(lambda: f"Bearer {segment([1])}.{segment(claims())}.", 401),
    "oversized_garbage": BadAuth(lambda: "Bearer " + "x" * 1024 * 1024, 401),
    "garbage_segments_under_the_limit": BadAuth(
        lambda: "Bearer " + ".".join(["x" * 4000] * 3), 401
    ),
}


def valid_authorization() -> str:
    return bearer(sign_rs256(claims()))
