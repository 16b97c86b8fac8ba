"""OIDC verification of Pub/Sub push requests (``Authorization: Bearer <JWT>``).

google-auth checks the signature, ``iat``/``exp`` and, only when given one, the
audience; it checks neither ``email`` nor ``email_verified``. Both are checked here,
with the issuer. Google's certificates are fetched once and kept for the lifetime
their ``Cache-Control: max-age`` allows; a token naming an unknown key id triggers at
most one refetch a minute, so a flood of forged tokens cannot hammer Google.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.auth import exceptions as auth_exceptions
from google.auth import jwt

from worker.exceptions import WorkerError

log = logging.getLogger(__name__)

GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
ISSUER = "https://accounts.google.com"
DEFAULT_CERTS_TTL_S = 3600
MIN_REFETCH_INTERVAL_S = 60
CLOCK_SKEW_S = 10

CertsFetch = Callable[[], Awaitable[tuple[Mapping[str, str], float]]]


class AuthError(Exception):
    """401: no token, or a token that is not valid."""


class ForbiddenError(Exception):
    """403: a valid token of an identity that may not push."""


class CertsUnavailableError(WorkerError):
    """Google's certificates could not be fetched: answer 503, Pub/Sub retries."""

    transient = True


async def fetch_google_certs() -> tuple[Mapping[str, str], float]:
    """Google's current signing certificates, and for how long they may be kept."""
    import google.auth.transport.requests as transport_requests

    def fetch() -> tuple[Mapping[str, str], float]:
        request = transport_requests.Request()
        response = request(GOOGLE_CERTS_URL, method="GET")
        if response.status != 200:
            raise CertsUnavailableError(f"certificates: HTTP {response.status}")
        certs: dict[str, str] = json.loads(response.data)
        control = response.headers.get("cache-control", "")
        match = re.search(r"max-age=(\d+)", control)
        return certs, float(match.group(1)) if match else DEFAULT_CERTS_TTL_S

    try:
        return await asyncio.to_thread(fetch)
    except CertsUnavailableError:
        raise
    except Exception as error:  # any transport failure
        raise CertsUnavailableError(f"certificates unavailable: {error}") from error


class CertCache:
    def __init__(self, fetch: CertsFetch = fetch_google_certs) -> None:
        self._fetch = fetch
        self._certs: Mapping[str, str] = {}
        self._expires_at = 0.0
        self._last_fetch = float("-inf")
        self._lock = asyncio.Lock()

    async def certs(self, key_id: str | None) -> Mapping[str, str]:
        now = time.monotonic()
        unknown = key_id is not None and key_id not in self._certs
        stale = now >= self._expires_at
        may_refetch = now - self._last_fetch >= MIN_REFETCH_INTERVAL_S
        if stale or (unknown and may_refetch):
            async with self._lock:
                if time.monotonic() >= self._expires_at or (unknown and key_id not in self._certs):
                    self._last_fetch = time.monotonic()
                    certs, ttl_s = await self._fetch()
                    self._certs = dict(certs)
                    self._expires_at = time.monotonic() + ttl_s
        return self._certs


@dataclass(frozen=True)
class PushIdentity:
    email: str
    subject: str


class PushVerifier:
    """Checks a push request's bearer token; raises ``AuthError`` or ``ForbiddenError``."""

    def __init__(
        self,
        audience: str,
        service_accounts: Sequence[str],
        certs: CertCache | None = None,
    ) -> None:
        if not audience:
            raise ValueError("an OIDC audience is required")
        self.audience = audience
        self.service_accounts = frozenset(service_accounts)
        self.certs = certs or CertCache()

    async def verify(self, authorization: str | None) -> PushIdentity:
        if not authorization:
            raise AuthError("no Authorization header")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("Authorization is not a Bearer token")
        token = token.strip()
        try:
            header = jwt.decode_header(token)  # type: ignore[no-untyped-call]
        except (ValueError, auth_exceptions.GoogleAuthError) as error:
            raise AuthError(f"malformed token: {error}") from None
        key_id = header.get("kid") if isinstance(header, dict) else None
        certs = await self.certs.certs(key_id if isinstance(key_id, str) else None)
        try:
            claims: Mapping[str, Any] = jwt.decode(  # type: ignore[no-untyped-call]
                token,
                certs=certs,
                audience=self.audience,
                clock_skew_in_seconds=CLOCK_SKEW_S,
            )
        except (ValueError, TypeError, auth_exceptions.GoogleAuthError) as error:
            raise AuthError(f"invalid token: {error}") from None
        if claims.get("iss") != ISSUER:
            raise AuthError(f"invalid token: issuer {claims.get('iss')!r}")
        email = claims.get("email")
        if not isinstance(email, str) or email not in self.service_accounts:
            raise ForbiddenError(f"identity {email!r} may not push")
        if claims.get("email_verified") is not True:
            raise ForbiddenError(f"identity {email!r} is not verified")
        return PushIdentity(email=email, subject=str(claims.get("sub", "")))
