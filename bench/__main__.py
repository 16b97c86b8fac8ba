"""``python -m bench [SCENARIO ...]``: run benchmark scenarios, print JSON lines."""

from __future__ import annotations

import sys

from bench import (
    backup,
    common,
    cpu,
    drain,
    ingest,
    invalidation,
    latency,
    push,
    read,
    replay,
    retention,
    stack,
    store,
)
from worker.cli.main import run_async

SCENARIOS = {
    "store": store.run,
    "drain": drain.run,
    "batched": ingest.run_batched,
    "latency": latency.run,
    "rss": drain.run_rss,
    "cpu": cpu.run,
    "read": read.run,
    "invalidation": invalidation.run,
    "push": push.run,
    "backup": backup.run,
    "retention": retention.run,
    "replay": replay.run,
}


def main(argv: list[str]) -> int:
    names = argv or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s) {unknown}; known: {sorted(SCENARIOS)}", file=sys.stderr)
        return 2
    for name in names:
        # The same event loop as the worker's commands.
        run_async(_run(name))
    return 0


async def _run(name: str) -> None:
    try:
        await SCENARIOS[name]()
    finally:
        await stack.cleanup()
        await common.drop_databases()


raise SystemExit(main(sys.argv[1:]))
