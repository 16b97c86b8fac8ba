"""The push source: Pub/Sub push requests into the same pipelines as pull.

Each request becomes a ``Delivery`` whose settlement resolves a future: the request
is answered once its own message is committed or dead-lettered (204), or nacked
after a transient failure (503, and Pub/Sub retries). Concurrent requests are
coalesced into the same micro-batches as pulled messages, through the same handlers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from datetime import UTC, datetime
from typing import Any

import orjson

from worker.exceptions import EnvelopeError as EnvelopeError  # importable from here too
from worker.exceptions import InvalidEncodingError, PermanentError, SchemaViolationError
from worker.pipeline.delivery import Delivery
from worker.runtime import Runtime

log = logging.getLogger(__name__)

MAX_PUSH_BODY_BYTES = 16 * 1024 * 1024


class _FutureSettler:
    def ack(self, delivery: Delivery) -> None:
        _resolve(delivery, True)

    def nack(self, delivery: Delivery) -> None:
        _resolve(delivery, False)


def _resolve(delivery: Delivery, committed: bool) -> None:
    future = delivery.token
    assert isinstance(future, asyncio.Future)
    if not future.done():
        future.set_result(committed)


_SETTLER = _FutureSettler()


def _field(message: dict[str, Any], camel: str, snake: str) -> Any:
    return message.get(camel, message.get(snake))


_EARLIEST = datetime.min.replace(tzinfo=UTC)


def _publish_time(value: Any) -> tuple[datetime, SchemaViolationError | None]:
    """The publish time in UTC, as the pull source gives it; or, for a time UTC cannot
    hold (year 1 at +14:00), the earliest time and the message's schema violation."""
    if not isinstance(value, str):
        return datetime.now(UTC), None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise EnvelopeError(f"message.publishTime is not RFC 3339: {value[:64]!r}") from None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC), None
    try:
        return moment.astimezone(UTC), None
    except OverflowError:
        return _EARLIEST, SchemaViolationError(f"publishTime: out of range: {value[:64]}")


def parse_envelope(body: bytes) -> Delivery:
    """A push envelope to a Delivery (settled later through its future).

    Data that is not strict base64 is kept as received and marked ``invalid_encoding``:
    it is the publisher's message, so it is dead-lettered, not refused with 400.
    """
    try:
        envelope = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise EnvelopeError(f"body is not JSON: {error}") from None
    if not isinstance(envelope, dict) or not isinstance(envelope.get("message"), dict):
        raise EnvelopeError("body is not a push envelope: 'message' object missing")
    message: dict[str, Any] = envelope["message"]
    message_id = _field(message, "messageId", "message_id")
    if not isinstance(message_id, str) or not message_id:
        raise EnvelopeError("message.messageId missing")
    attributes = message.get("attributes") or {}
    if not isinstance(attributes, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in attributes.items()
    ):
        raise EnvelopeError("message.attributes must map strings to strings")
    raw = message.get("data", "")
    if not isinstance(raw, str):
        raise EnvelopeError("message.data must be a base64 string")
    refused: PermanentError | None = None
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        data, refused = raw.encode("utf-8"), InvalidEncodingError("data: not valid base64")
    publish_time, out_of_range = _publish_time(_field(message, "publishTime", "publish_time"))
    attempt = envelope.get("deliveryAttempt")
    subscription = envelope.get("subscription")
    return Delivery(
        data=data,
        attributes=dict(attributes),
        message_id=message_id,
        publish_time=publish_time,
        subscription=subscription if isinstance(subscription, str) else "",
        settler=_SETTLER,
        delivery_attempt=attempt if isinstance(attempt, int) else None,
        error=refused or out_of_range,
    )


class PushIngest:
    """Push requests into the runtime's pipelines, one per registered topic."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Run every topic's start-up hook and start its pipeline."""
        names = self.runtime.registry.names()
        await self.runtime.prepare(names)
        for name in names:
            self.runtime.pipeline(name)
        # Kept: asyncio.get_running_loop() makes a getpid() system call each time,
        # once per request otherwise.
        self._loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        """Commit what the pipelines hold (requests in flight were answered)."""
        await self.runtime.drain()

    def handles(self, topic: str) -> bool:
        return topic in self.runtime.registry

    async def deliver(self, topic: str, delivery: Delivery) -> bool:
        """True once committed or dead-lettered; False when nacked (transient)."""
        if self._loop is None:
            raise RuntimeError("PushIngest.start() was not called")
        future: asyncio.Future[bool] = self._loop.create_future()
        delivery.token = future
        self.runtime.pipeline(topic).submit(delivery)
        return await future
