"""``POST /push/{topic}``: the answer to one push request, served at the ASGI level.

Every push request is small and the server must take thousands a second on one
core. Starlette's middleware layers, request objects and routing, and FastAPI's
dependency solving, cost several times what the push itself costs, so the app
(``worker.api.WorkerApp``) hands ``POST /push/...`` to ``PushEndpoint`` straight
from the ASGI scope. The FastAPI route of the same path stays, for the OpenAPI
document; both call ``answer``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import orjson
from starlette.types import Receive, Scope, Send

from worker.oidc import AuthError, ForbiddenError, PushVerifier
from worker.push import MAX_PUSH_BODY_BYTES, EnvelopeError, PushIngest, parse_envelope

PUSH_PREFIX = "/push/"
_READ_HEADERS = frozenset({b"content-type", b"authorization", b"content-length"})

ReadBody = Callable[[int], Awaitable[bytes | None]]
"""Reads the request body; None as soon as it exceeds the given limit."""


@dataclass(frozen=True)
class PushReply:
    status: int
    error: str | None = None
    detail: str | None = None

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
    committed (Pub/Sub retries), else 400/401/403/404/413/415. ``headers`` are keyed
    by lower-case name."""
    media_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        return PushReply(415, "unsupported_media_type", "Content-Type must be application/json")
    if verifier is not None:
        try:
            await verifier.verify(headers.get("authorization"))
        except AuthError as error:
            return PushReply(401, "unauthorized", str(error))
        except ForbiddenError as error:
            return PushReply(403, "forbidden", str(error))
    declared = headers.get("content-length", "")
    too_large = declared.isdigit() and int(declared) > MAX_PUSH_BODY_BYTES
    # The cap holds whatever Content-Length says: read_body counts what arrives.
    body = None if too_large else await read_body(MAX_PUSH_BODY_BYTES)
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


async def read_capped(receive: Receive, limit: int) -> bytes | None:
    """The ASGI request body, or None as soon as more than ``limit`` bytes arrived."""
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

    def __init__(self, push: Callable[[], PushIngest], verifier: PushVerifier | None) -> None:
        self.push = push
        self.verifier = verifier

    async def __call__(self, topic: str, scope: Scope, receive: Receive, send: Send) -> None:
        # Only the headers the answer reads (ASGI gives names in lower case).
        headers = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope["headers"]
            if name in _READ_HEADERS
        }

        async def read_body(limit: int) -> bytes | None:
            return await read_capped(receive, limit)

        reply = await answer(self.push(), self.verifier, topic, headers, read_body)
        body = reply.body()
        response_headers = []  # a 204 carries neither a body nor a Content-Length
        if body:
            response_headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode("ascii")),
            ]
        await send(
            {"type": "http.response.start", "status": reply.status, "headers": response_headers}
        )
        await send({"type": "http.response.body", "body": body})
