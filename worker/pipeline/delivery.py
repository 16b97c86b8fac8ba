"""A message as the runtime sees it, whatever source brought it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from worker.exceptions import PermanentError


class Settler(Protocol):
    """How a source is told the fate of one of its messages (each called once)."""

    def ack(self, delivery: Delivery) -> None: ...

    def nack(self, delivery: Delivery) -> None: ...


@dataclass(eq=False, slots=True)
class Delivery:
    """One delivery of one Pub/Sub message: pull and push both make these.

    ``token`` is the source's own handle (an ack id, a pending HTTP response);
    ``received_at`` is when the source got it (``time.monotonic()``).
    """

    data: bytes
    attributes: dict[str, str]
    message_id: str
    publish_time: datetime
    subscription: str
    settler: Settler
    token: object = None
    delivery_attempt: int | None = None
    # Set by a source that already knows the message can never apply (push data
    # that is not base64): the pipeline dead-letters it without decoding.
    error: PermanentError | None = None
    received_at: float = field(default_factory=time.monotonic)
    settled: bool = field(default=False)

    def ack(self) -> None:
        if not self.settled:
            self.settled = True
            self.settler.ack(self)

    def nack(self) -> None:
        if not self.settled:
            self.settled = True
            self.settler.nack(self)
