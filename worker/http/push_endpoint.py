"""``POST /push/{topic}``: the answer to one push request, served at the ASGI level.

Every push request is small and the server must take thousands a second on one
core. Starlette's middleware layers, request objects and routing, and FastAPI's
dependency solving, cost several times what the push itself costs, so the app
(``worker.http.app.WorkerApp``) hands ``POST /push/...`` to ``PushEndpoint`` straight
from the ASGI scope. The FastAPI route of the same path stays, for the OpenAPI
document; both call ``answer``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import orjson
from starlette.types import Receive, Scope, Send

from worker.http.limits import Deadlines
from worker.http.oidc import AuthError, CertsUnavailableError, ForbiddenError, PushVerifier
from worker.sources.push import MAX_PUSH_BODY_BYTES, EnvelopeError, PushIngest, parse_envelope

log = logging.getLogger(__name__)

PUSH_PREFIX = "/push/"
BODY_TIMEOUT_S = 30.0
_READ_HEADERS = frozenset({b"content-type", b"authorization", b"content-length"})
_LOGGED_REASON_CHARS = 200

ReadBody = Callable[[int], Awaitable[bytes | None]]
"""Reads the request body; None as soon as it exceeds the given limit; raises
``BodyTimeoutError`` when the whole body has not arrived in time."""


class BodyTimeoutError(Exception):
    """The request body did not arrive within the read timeout."""


@dataclass(frozen=True)
class PushReply:
    status: int
    error: str | None = None
    detail: str | None = None
    close: bool = False  # answer with ``connection: close``

    def body(self) -> bytes:
        if self.error is None:
            return b""
        return orjson.dumps({"error": self.error, "detail": self.detail})


NO_CONTENT = PushReply(204)


async def answer(
    push: PushIngest,
    verifier: PushVerifier | None,
    topic: str,
    headers: Mapping[str, str],
    read_body: ReadBody,
) -> PushReply:
    """CONTRACT.md's push answer: 204 once committed or dead-lettered, 503 when not
    committed or the token cannot be checked now (Pub/Sub retries), 408 when the body
    does not arrive in time, else 400/401/403/404/413/415. ``headers`` are keyed by
    lower-case name."""
    media_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        return PushReply(415, "unsupported_media_type", "Content-Type must be application/json")
    if verifier is not None:
        # Fixed details: the exception's text may quote the token or the audience.
        try:
            await verifier.verify(headers.get("authorization"))
        except AuthError as error:
            _log_refusal("push token refused", topic, error)
            return PushReply(401, "unauthorized", "invalid or missing token")
        except ForbiddenError as error:
            _log_refusal("push identity refused", topic, error)
            return PushReply(403, "forbidden", "identity may not push")
        except CertsUnavailableError as error:
            log.warning(
                "push token not verified: certificates unavailable",
                extra={"topic": topic[:_LOGGED_REASON_CHARS], "reason": _cut(error)},
            )
            return PushReply(503, "unavailable", "token verification unavailable; retry")
    declared = headers.get("content-length", "")
    too_large = declared.isdigit() and int(declared) > MAX_PUSH_BODY_BYTES
    # The cap holds whatever Content-Length says: read_body counts what arrives.
    try:
        body = None if too_large else await read_body(MAX_PUSH_BODY_BYTES)
    except BodyTimeoutError as error:
        return PushReply(408, "request_timeout", str(error), close=True)
    if body is None:
        return PushReply(413, "too_large", f"body over {MAX_PUSH_BODY_BYTES} bytes")
    if not push.handles(topic):
        return PushReply(404, "not_found", f"no handler for topic {topic!r}")
    try:
        delivery = parse_envelope(body)
    except EnvelopeError as error:
        return PushReply(400, "bad_request", str(error))
    if await push.deliver(topic, delivery):
        return NO_CONTENT
    return PushReply(503, "unavailable", "not committed; retry")


def _cut(error: BaseException) -> str:
    return str(error)[:_LOGGED_REASON_CHARS]


def _log_refusal(message: str, topic: str, error: BaseException) -> None:
    log.info(message, extra={"topic": topic[:_LOGGED_REASON_CHARS], "reason": _cut(error)})


async def read_capped(
    receive: Receive, limit: int, timeout_s: float = BODY_TIMEOUT_S
) -> bytes | None:
    """The ASGI request body, or None as soon as more than ``limit`` bytes arrived.

    Raises ``BodyTimeoutError`` unless the whole body arrived within ``timeout_s``: a
    client announcing a body and never sending it would otherwise hold the request
    (and its buffers) for as long as it keeps the connection open.
    """
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_capped(receive, limit)
    except TimeoutError:
        raise BodyTimeoutError(f"body not received within {timeout_s:g} s") from None


async def read_within(deadlines: Deadlines, receive: Receive, limit: int) -> bytes | None:
    """``read_capped`` bounded by ``deadlines`` (one timer for every request's read)."""
    try:
        return await deadlines.run(_read_capped(receive, limit))
    except TimeoutError:
        raise BodyTimeoutError(f"body not received within {deadlines.timeout_s:g} s") from None


async def _read_capped(receive: Receive, limit: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        event = await receive()
        chunk = event.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not event.get("more_body", False):
            return b"".join(chunks)


def push_topic(scope: Scope) -> str | None:
    """The topic of a ``POST /push/{topic}`` request; None for any other request."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return None
    path: str = scope["path"]
    if not path.startswith(PUSH_PREFIX) or "/" in path[len(PUSH_PREFIX) :]:
        return None
    return path[len(PUSH_PREFIX) :]


class PushEndpoint:
    """Answers one ``POST /push/{topic}`` request at the ASGI level.

    ``push`` gives the running app's ``PushIngest`` (it exists once the lifespan has
    started).
    """

    def __init__(
        self,
        push: Callable[[], PushIngest],
        verifier: PushVerifier | None,
        body_timeout_s: float = BODY_TIMEOUT_S,
    ) -> None:
        self.push = push
        self.verifier = verifier
        self.body_deadlines = Deadlines(body_timeout_s)

    async def __call__(self, topic: str, scope: Scope, receive: Receive, send: Send) -> None:
        # Only the headers the answer reads (ASGI gives names in lower case).
        headers = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope["headers"]
            if name in _READ_HEADERS
        }

        async def read_body(limit: int) -> bytes | None:
            return await read_within(self.body_deadlines, receive, limit)

        reply = await answer(self.push(), self.verifier, topic, headers, read_body)
        body = reply.body()
        response_headers = []  # a 204 carries neither a body nor a Content-Length
        if body:
            response_headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode("ascii")),
            ]
        if reply.close:
            response_headers.append((b"connection", b"close"))
        await send(
            {"type": "http.response.start", "status": reply.status, "headers": response_headers}
        )
        await send({"type": "http.response.body", "body": body})
