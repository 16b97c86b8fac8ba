"""Progress of a long step (a dump, an upload, a restore): bytes done and the rate.

On a terminal it redraws one line in place; otherwise (a worker, a CI log) it logs a
JSON line every ``log_every_s`` seconds, so a run that takes an hour is never silent.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

log = logging.getLogger(__name__)

MIB = 1024 * 1024


def _mib(count: int) -> str:
    return f"{count / MIB:,.1f} MiB"


class Progress:
    def __init__(
        self,
        step: str,
        *,
        total_bytes: int | None = None,
        stream: TextIO | None = None,
        log_every_s: float = 10.0,
        draw_every_s: float = 0.5,
        unit: str = "bytes",
    ) -> None:
        self.step = step
        self.unit = unit
        self.total_bytes = total_bytes
        self.done_bytes = 0
        self._stream = stream if stream is not None else sys.stderr
        self._terminal = self._stream.isatty()
        self._every_s = draw_every_s if self._terminal else log_every_s
        self._started = time.monotonic()
        self._shown = self._started

    @property
    def seconds(self) -> float:
        return time.monotonic() - self._started

    def rate_mib_per_s(self) -> float:
        return self.done_bytes / MIB / max(self.seconds, 1e-9)

    def advance(self, count: int) -> None:
        self.done_bytes += count
        now = time.monotonic()
        if now - self._shown >= self._every_s:
            self._shown = now
            self._show(final=False)

    def finish(self) -> None:
        self._show(final=True)

    def _show(self, *, final: bool) -> None:
        line, fields = self._bytes() if self.unit == "bytes" else self._count()
        if self._terminal:
            self._stream.write(f"\r{self.step}: {line}\x1b[K" + ("\n" if final else ""))
            self._stream.flush()
            return
        fields = {"step": self.step, **fields, "seconds": round(self.seconds, 1)}
        log.info(f"{self.step} {'done' if final else 'in progress'}", extra=fields)

    def _bytes(self) -> tuple[str, dict[str, Any]]:
        rate = self.rate_mib_per_s()
        of = f" of {_mib(self.total_bytes)}" if self.total_bytes else ""
        fields = {
            "bytes": self.done_bytes,
            "total_bytes": self.total_bytes,
            "mib_per_s": round(rate, 1),
        }
        return f"{_mib(self.done_bytes)}{of}  {rate:,.1f} MiB/s", fields

    def _count(self) -> tuple[str, dict[str, Any]]:
        """Progress in items (rows), not bytes."""
        rate = self.done_bytes / max(self.seconds, 1e-9)
        fields = {self.unit: self.done_bytes, f"{self.unit}_per_s": round(rate, 1)}
        return f"{self.done_bytes:,} {self.unit}  {rate:,.0f} {self.unit}/s", fields
