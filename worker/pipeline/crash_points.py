"""Test-only crash points: the process SIGKILLs itself at a named step of a batch.

The fault tests prove that no moment of a crash loses or doubles an effect. Random
kills rarely land in the narrow windows that matter, so ``WORKER_CRASH_AT`` names one:

- ``before_commit``: a handler's statements ran, its transaction is not committed;
- ``after_commit``: the batch committed, its cache invalidations are not published;
- ``after_publish``: the invalidations are published, the messages are not acked;
- ``retention_after_export|after_verify|after_delete|before_ledger``: the steps of a
  retention chunk (``handlers.retention.sweep``).

``WORKER_CRASH_AT=after_commit:3`` kills on the third time the point is reached (the
count is per process). The variable is read once, at ``run``/``serve`` start-up; unset,
every ``reach`` is a no-op, so production code pays one comparison per batch.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger(__name__)

ENV_VAR = "WORKER_CRASH_AT"


class CrashPoint(enum.Enum):
    BEFORE_COMMIT = "before_commit"
    AFTER_COMMIT = "after_commit"
    AFTER_PUBLISH = "after_publish"
    # A retention chunk (handlers/retention): its object and manifest are written; read
    # back and checked; its rows deleted (not committed); committed, ledger not noted.
    RETENTION_AFTER_EXPORT = "retention_after_export"
    RETENTION_AFTER_VERIFY = "retention_after_verify"
    RETENTION_AFTER_DELETE = "retention_after_delete"
    RETENTION_BEFORE_LEDGER = "retention_before_ledger"
    # A dead-letter replay (worker/dlq): a batch published, its dead letters not acked.
    REPLAY_AFTER_PUBLISH = "replay_after_publish"


PIPELINE_POINTS = (CrashPoint.BEFORE_COMMIT, CrashPoint.AFTER_COMMIT, CrashPoint.AFTER_PUBLISH)
"""The points of a batch's way through a pipeline (every topic reaches them)."""

RETENTION_POINTS = (
    CrashPoint.RETENTION_AFTER_EXPORT,
    CrashPoint.RETENTION_AFTER_VERIFY,
    CrashPoint.RETENTION_AFTER_DELETE,
    CrashPoint.RETENTION_BEFORE_LEDGER,
)
"""The points of a retention chunk (only a retention run reaches them)."""


def _sigkill() -> None:
    # SIGKILL, not an exception or exit(): nothing may run after this point (no
    # rollback, no finally, no ack flush), exactly as when the machine loses the process.
    os.kill(os.getpid(), signal.SIGKILL)


class CrashPoints:
    """At most one armed point, and how many times it is reached before the kill."""

    def __init__(
        self,
        point: CrashPoint | None = None,
        on_hit: int = 1,
        kill: Callable[[], None] = _sigkill,
    ) -> None:
        if on_hit < 1:
            raise ValueError(f"{ENV_VAR}: the count must be 1 or more, got {on_hit}")
        self.point = point
        self.on_hit = on_hit
        self.hits = 0
        self._kill = kill

    @classmethod
    def disarmed(cls) -> CrashPoints:
        return cls()

    @classmethod
    def parse(cls, text: str) -> CrashPoints:
        """``"name"`` or ``"name:count"``; empty text is disarmed."""
        text = text.strip()
        if not text:
            return cls()
        name, _, count = text.partition(":")
        try:
            point = CrashPoint(name.strip())
        except ValueError:
            known = ", ".join(p.value for p in CrashPoint)
            raise ValueError(f"{ENV_VAR}: unknown crash point {name!r}; known: {known}") from None
        try:
            on_hit = int(count) if count.strip() else 1
        except ValueError:
            raise ValueError(f"{ENV_VAR}: count must be an integer, got {count!r}") from None
        return cls(point, on_hit)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> CrashPoints:
        """Parsed from ``WORKER_CRASH_AT``; warns loudly when a point is armed."""
        points = cls.parse((os.environ if env is None else env).get(ENV_VAR, ""))
        if points.point is not None:
            log.warning(
                "crash point armed: this process will SIGKILL itself (tests only)",
                extra={"crash_point": points.point.value, "on_hit": points.on_hit},
            )
        return points

    def armed(self, point: CrashPoint) -> bool:
        return self.point is point

    def reach(self, point: CrashPoint) -> None:
        """The pipeline got to ``point``: kill the process if this is the armed hit."""
        if self.point is not point:
            return
        self.hits += 1
        if self.hits == self.on_hit:
            log.warning(
                "crash point reached, killing the process",
                extra={"crash_point": point.value, "hit": self.hits, "pid": os.getpid()},
            )
            self._kill()

    def guard_commits(self, engine: AsyncEngine) -> AsyncEngine:
        """``engine``, or when ``before_commit`` is armed a copy that reaches it before
        every COMMIT of a transaction begun on it.

        The copy shares the pool; only the pipeline hands it to handlers, so the read
        path and start-up never reach the point. A handler's transaction is its own
        business (``apply`` opens and commits it), and SQLAlchemy's ``commit`` event is
        the one place between its last statement and its COMMIT that needs no change
        to any handler. Note that for ``metrics`` this includes the short transaction
        that creates the partition of a month new to the process.
        """
        if self.point is not CrashPoint.BEFORE_COMMIT:
            return engine
        guarded = engine.execution_options()

        def before_commit(conn: Any) -> None:
            self.reach(CrashPoint.BEFORE_COMMIT)

        # Listeners on an execution_options() copy fire for that copy only.
        event.listen(guarded.sync_engine, "commit", before_commit)
        return guarded
