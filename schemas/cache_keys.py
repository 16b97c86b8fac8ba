"""CONTRACT.md's Redis keys and TTLs, declared once.

The write side names these keys in the invalidations it publishes; the read side
fills them. Both import this module, so neither depends on the other, and a key
spelt differently on the two sides cannot happen.
"""

from __future__ import annotations

from uuid import UUID

STATS_TTL_S = 3600
JOB_TTL_S = 300
RECENT_TTL_S = 300
RECENT_LIMIT = 100
"""Samples under a series' recent key, newest first."""


def stats_cache_key(insight_id: str) -> str:
    return f"feedback:stats:{insight_id}"


def job_cache_key(job_id: UUID | str) -> str:
    return f"backfill:job:{job_id}"


def recent_cache_key(service_name: str, metric_type: str) -> str:
    return f"metrics:{service_name}:{metric_type}:recent"
