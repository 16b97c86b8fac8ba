"""``python -m bench [SCENARIO ...]``: run benchmark scenarios, print JSON lines."""

from __future__ import annotations

import asyncio
import sys

from bench import drain, ingest, store

SCENARIOS = {
    "store": store.run,
    "drain": drain.run,
    "batched": ingest.run_batched,
    "latency": ingest.run_latency,
    "rss": drain.run_rss,
}


def main(argv: list[str]) -> int:
    names = argv or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s) {unknown}; known: {sorted(SCENARIOS)}", file=sys.stderr)
        return 2
    for name in names:
        asyncio.run(SCENARIOS[name]())
    return 0


raise SystemExit(main(sys.argv[1:]))
