"""Long-lived loops that an unexpected exception restarts instead of ending.

A pull, settle or flush loop that dies takes its subscription with it: messages it
held keep their leases extended (or never get their acks) and Pub/Sub neither
redelivers nor dead-letters them. Such a loop runs under ``keep_running``: the
exception is logged once with its stack, counted, and the loop starts again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

RESTART_DELAY_S = 0.5
"""Pause before a restart: a loop failing at once every time must not spin a core."""


async def keep_running(
    name: str,
    loop: Callable[[], Awaitable[None]],
    count_error: Callable[[str], None],
    restart_delay_s: float = RESTART_DELAY_S,
) -> None:
    """Await ``loop()`` again whenever it raises; return when it returns.

    Cancellation ends it as usual. ``count_error`` is told the loop's name each time.
    """
    while True:
        try:
            await loop()
        except Exception:
            log.exception("loop failed unexpectedly, restarting", extra={"loop": name})
            count_error(name)
            await asyncio.sleep(restart_delay_s)
        else:
            return
