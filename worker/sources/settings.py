"""How the pull source reads a subscription: flow control and pull sizes.

Apart from ``pull`` so that the command line can show the defaults without loading
the Pub/Sub client.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PullSettings:
    pullers: int = 8
    max_outstanding_messages: int = 10_000
    max_outstanding_bytes: int = 32 * 1024 * 1024
    pull_timeout_s: float = 2.0
    ack_deadline_s: int = 60
    lease_check_every_s: float = 1.0
    lease_margin_s: float = 5.0
    settle_every_ms: int = 20
