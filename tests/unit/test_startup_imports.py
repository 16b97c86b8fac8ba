"""What a command loads before it runs: a maintenance command (backup, retention,
archive) needs neither Pub/Sub nor Redis, which cost a second of start-up and tens of
MB of memory (README, retention benchmark)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
import worker.cli.main as main
main._parser()
from worker.cli import backup, retention
import handlers.maintenance
print(",".join(m for m in ("grpc", "google.pubsub_v1", "redis") if m in sys.modules))
"""


def test_the_command_line_and_maintenance_load_no_pubsub_or_redis_client() -> None:
    loaded = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == ""
