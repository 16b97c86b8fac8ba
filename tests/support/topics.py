"""The project's topic registry, as the tests use it."""

from __future__ import annotations

from handlers import registry

REGISTRY = registry()
INGEST_TOPICS = ("backfill-progress", "feedback", "metrics")
"""The topics whose messages write rows."""
RUN_TOPICS = REGISTRY.pulled_by_default()
"""What ``utxoiq-worker run`` consumes without ``--only``."""
