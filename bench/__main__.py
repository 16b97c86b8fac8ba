"""``python -m bench [SCENARIO ...]``: run benchmark scenarios, print JSON lines."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any

from bench import drain, ingest, invalidation, push, read, stack, store

SCENARIOS = {
    "store": store.run,
    "drain": drain.run,
    "batched": ingest.run_batched,
    "latency": ingest.run_latency,
    "rss": drain.run_rss,
    "read": read.run,
    "invalidation": invalidation.run,
    "push": push.run,
}


def main(argv: list[str]) -> int:
    names = argv or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s) {unknown}; known: {sorted(SCENARIOS)}", file=sys.stderr)
        return 2
    for name in names:
        # The same event loop as the worker's commands (worker.cli.run_async).
        run_async(_run(name))
    return 0


def run_async(coroutine: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coroutine)
    else:
        uvloop.run(coroutine)


async def _run(name: str) -> None:
    try:
        await SCENARIOS[name]()
    finally:
        await stack.cleanup()


raise SystemExit(main(sys.argv[1:]))
