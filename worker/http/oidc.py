"""OIDC verification of Pub/Sub push requests (``Authorization: Bearer <JWT>``).

google-auth checks the signature, ``iat``/``exp`` and, only when given one, the
audience; it checks neither ``nbf``, ``email`` nor ``email_verified``. Those are
checked here, with the issuer.

Google's certificates are fetched once and kept for the lifetime their
``Cache-Control: max-age`` allows; a token naming an unknown key id triggers at most
one refetch a minute, so a flood of forged tokens cannot hammer Google. At most one
fetch is in flight, bounded by a short timeout; after a failed fetch, callers fail
at once with ``CertsUnavailableError`` (503, Pub/Sub retries) for a few seconds
instead of each trying again.

The message of ``AuthError`` and ``ForbiddenError`` is a fixed text the endpoint may
send to the client: it echoes nothing the client sent and names no configuration.
The detail goes to the log, cut short.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.auth import exceptions as auth_exceptions
from google.auth import jwt

from worker.exceptions import AuthError as AuthError  # importable from here too
from worker.exceptions import ForbiddenError as ForbiddenError
from worker.exceptions import WorkerError

log = logging.getLogger(__name__)

GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
ISSUER = "https://accounts.google.com"
DEFAULT_CERTS_TTL_S = 3600
MIN_REFETCH_INTERVAL_S = 60
CLOCK_SKEW_S = 10
CERTS_FETCH_TIMEOUT_S = 3.0
CERTS_RETRY_AFTER_S = 10.0
# Google's tokens are about 1 KB; anything far larger is refused before decoding.
MAX_TOKEN_CHARS = 16 * 1024
MAX_LOGGED_CHARS = 200

NO_HEADER = "no Authorization header"
NOT_BEARER = "Authorization is not a Bearer token"
INVALID_TOKEN = "invalid token"
NOT_YET_VALID = "token not yet valid"
MAY_NOT_PUSH = "identity may not push"
CERTS_UNAVAILABLE = "Google's certificates are unavailable"

CertsFetch = Callable[[], Awaitable[tuple[Mapping[str, str], float]]]


class CertsUnavailableError(WorkerError):
    """Google's certificates could not be fetched: answer 503, Pub/Sub retries."""

    transient = True


def _cut(text: str) -> str:
    return text if len(text) <= MAX_LOGGED_CHARS else text[:MAX_LOGGED_CHARS] + "..."


def _fetch_certs_blocking(url: str, timeout_s: float) -> tuple[Mapping[str, str], float]:
    import google.auth.transport.requests as transport_requests

    request = transport_requests.Request()
    try:
        response = request(url, method="GET", timeout=timeout_s)
    finally:
        request.session.close()
    if response.status != 200:
        raise CertsUnavailableError(f"certificates: HTTP {response.status}")
    certs = json.loads(response.data)
    if not isinstance(certs, dict) or not all(isinstance(v, str) for v in certs.values()):
        raise CertsUnavailableError("certificates: not a JSON object of PEM strings")
    control = response.headers.get("cache-control", "")
    match = re.search(r"max-age=(\d+)", control)
    return certs, float(match.group(1)) if match else DEFAULT_CERTS_TTL_S


async def fetch_google_certs(
    url: str = GOOGLE_CERTS_URL, timeout_s: float = CERTS_FETCH_TIMEOUT_S
) -> tuple[Mapping[str, str], float]:
    """The certificates at ``url`` and for how long they may be kept.

    Any failure, including no answer within ``timeout_s``, is ``CertsUnavailableError``.
    """
    try:
        # The transport timeout bounds each connect and read; wait_for bounds the
        # whole exchange, which a server dripping bytes could otherwise stretch.
        return await asyncio.wait_for(
            asyncio.to_thread(_fetch_certs_blocking, url, timeout_s), timeout_s
        )
    except CertsUnavailableError:
        raise
    except TimeoutError as error:
        raise CertsUnavailableError(f"certificates: no answer within {timeout_s} s") from error
    except Exception as error:  # any transport or decoding failure
        raise CertsUnavailableError(f"certificates unavailable: {_cut(str(error))}") from error


def google_certs_fetcher(
    url: str = GOOGLE_CERTS_URL, timeout_s: float = CERTS_FETCH_TIMEOUT_S
) -> CertsFetch:
    """A ``CertCache`` fetch of the certificates at ``url`` within ``timeout_s``."""

    async def fetch() -> tuple[Mapping[str, str], float]:
        return await fetch_google_certs(url, timeout_s)

    return fetch


def _retrieve_exception(task: asyncio.Task[None]) -> None:
    # A fetch whose callers were all cancelled still fails quietly: no "Task exception
    # was never retrieved" (the failure was logged when it happened).
    if not task.cancelled():
        task.exception()


class CertCache:
    """Google's certificates, fetched by one task at a time and shared by all callers.

    ``fetch_timeout_s`` bounds any fetch, injected or not; for ``retry_after_s`` after
    a failure, callers that need a fetch fail at once without starting one.
    """

    def __init__(
        self,
        fetch: CertsFetch = fetch_google_certs,
        *,
        fetch_timeout_s: float = CERTS_FETCH_TIMEOUT_S,
        retry_after_s: float = CERTS_RETRY_AFTER_S,
    ) -> None:
        self._fetch = fetch
        self._fetch_timeout_s = fetch_timeout_s
        self._retry_after_s = retry_after_s
        self._certs: Mapping[str, str] = {}
        self._expires_at = 0.0
        self._last_fetch = float("-inf")
        self._failed_until = float("-inf")
        # Also the fetch's strong reference: the event loop keeps only weak ones.
        self._inflight: asyncio.Task[None] | None = None

    async def certs(self, key_id: str | None) -> Mapping[str, str]:
        now = time.monotonic()
        stale = now >= self._expires_at
        unknown = key_id is not None and key_id not in self._certs
        if not stale and not unknown:
            return self._certs
        task = self._inflight
        if task is None:
            if now < self._failed_until:
                if stale:
                    raise CertsUnavailableError(CERTS_UNAVAILABLE)
                return self._certs  # the unknown key id fails verification
            if not stale and now - self._last_fetch < MIN_REFETCH_INTERVAL_S:
                return self._certs
            self._last_fetch = now
            task = asyncio.get_running_loop().create_task(self._refresh())
            task.add_done_callback(_retrieve_exception)
            self._inflight = task
        # Shielded: a caller cancelled (its request gone) leaves the fetch to the others.
        await asyncio.shield(task)
        return self._certs

    async def _refresh(self) -> None:
        try:
            certs, ttl_s = await asyncio.wait_for(self._fetch(), self._fetch_timeout_s)
        except Exception as error:  # TimeoutError, CertsUnavailableError, a fetch's bug
            self._failed_until = time.monotonic() + self._retry_after_s
            log.warning(
                "Google's certificates could not be fetched",
                extra={"certs_error": _cut(repr(error)), "retry_after_s": self._retry_after_s},
            )
            raise CertsUnavailableError(CERTS_UNAVAILABLE) from error
        else:
            self._certs = dict(certs)
            self._expires_at = time.monotonic() + ttl_s
        finally:
            self._inflight = None


@dataclass(frozen=True)
class PushIdentity:
    email: str
    subject: str


class PushVerifier:
    """Checks a push request's bearer token; raises ``AuthError`` or ``ForbiddenError``.

    Raises ``CertsUnavailableError`` when Google's certificates cannot be had.
    """

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
            raise _refused(AuthError, NO_HEADER, "no Authorization header")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _refused(AuthError, NOT_BEARER, f"scheme {_cut(scheme)!r}")
        token = token.strip()
        if len(token) > MAX_TOKEN_CHARS:
            raise _refused(AuthError, INVALID_TOKEN, f"token of {len(token)} characters")
        try:
            header = jwt.decode_header(token)  # type: ignore[no-untyped-call]
        except (ValueError, TypeError, auth_exceptions.GoogleAuthError) as error:
            raise _refused(AuthError, INVALID_TOKEN, _detail(error, token)) from None
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
            raise _refused(AuthError, INVALID_TOKEN, _detail(error, token)) from None
        if claims.get("iss") != ISSUER:
            raise _refused(AuthError, INVALID_TOKEN, f"issuer {_cut(repr(claims.get('iss')))}")
        _check_not_before(claims.get("nbf"))
        email = claims.get("email")
        if not isinstance(email, str) or email not in self.service_accounts:
            raise _refused(
                ForbiddenError, MAY_NOT_PUSH, f"identity {_cut(repr(email))} not allowed"
            )
        if claims.get("email_verified") is not True:
            raise _refused(ForbiddenError, MAY_NOT_PUSH, f"identity {email!r} not verified")
        return PushIdentity(email=email, subject=str(claims.get("sub", "")))


def _check_not_before(nbf: object) -> None:
    """google-auth ignores ``nbf``: a token valid only later is refused here."""
    if nbf is None:
        return
    # bool is an int; JSON also admits NaN and Infinity, which compare as valid.
    if isinstance(nbf, bool) or not isinstance(nbf, int | float) or not math.isfinite(nbf):
        raise _refused(AuthError, INVALID_TOKEN, f"nbf {_cut(repr(nbf))}")
    now = datetime.now(UTC).timestamp()
    if nbf > now + CLOCK_SKEW_S:
        raise _refused(AuthError, NOT_YET_VALID, f"nbf {nbf} is {nbf - now:.0f} s ahead")


def _detail(error: Exception, token: str) -> str:
    # google-auth's messages may quote the token; it is never logged, even in part.
    return _cut(str(error).replace(token, "<token>"))


def _refused(
    kind: type[AuthError | ForbiddenError], message: str, detail: str
) -> AuthError | ForbiddenError:
    """``kind(message)``, the detail logged once beside it."""
    log.info(
        "push request refused: %s",
        message,
        extra={"auth_status": 401 if kind is AuthError else 403, "auth_detail": detail},
    )
    return kind(message)
