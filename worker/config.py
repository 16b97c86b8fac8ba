"""Settings read from the environment (CONTRACT.md, Configuration)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

DEFAULT_DATABASE_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/utxoiq"


N = TypeVar("N", int, float)


def _number(env: Mapping[str, str], name: str, default: N, what: str) -> N:
    """``name`` read as ``type(default)``; ``default`` when unset or empty."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return type(default)(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be {what}, got {raw!r}") from exc


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    return _number(env, name, default, "an integer")


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    return _number(env, name, default, "a number of seconds")


# Name of each timeout's variable, for the error that refuses a bad value.
_TIMEOUT_VARIABLES = {
    "database_connect_timeout_s": "DATABASE_CONNECT_TIMEOUT",
    "database_command_timeout_s": "DATABASE_COMMAND_TIMEOUT",
    "database_statement_timeout_s": "DATABASE_STATEMENT_TIMEOUT",
    "maintenance_heartbeat_s": "MAINTENANCE_HEARTBEAT",
    "maintenance_stale_s": "MAINTENANCE_STALE_AFTER",
    "dlq_lease_s": "DLQ_LEASE",
}


_RETENTION_ATTRIBUTES = (
    "backup_retention_days",
    "metrics_retention_days",
    "feedback_retention_days",
    "backfill_retention_days",
)


@dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    database_pool_size: int = 10
    database_max_overflow: int = 20
    database_pool_timeout_s: int = 30
    # Never infinite: a stalled network must fail a batch (nack) instead of hanging it.
    database_connect_timeout_s: float = 10.0
    database_command_timeout_s: float = 30.0  # client side, every statement (asyncpg)
    database_statement_timeout_s: float = 30.0  # server side (statement_timeout)
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_max_connections: int = 50
    google_cloud_project: str = "utxoiq-local"
    pubsub_emulator_host: str | None = None
    backup_url: str = "file://./var/backups"
    archive_url: str = "file://./var/archive"
    backup_retention_days: int = 7
    metrics_retention_days: int = 90
    feedback_retention_days: int = 730
    backfill_retention_days: int = 180
    # Where pg_dump and pg_restore are (e.g. /usr/lib/postgresql/17/bin); PATH if unset.
    pg_bin_dir: str | None = None
    # A maintenance run's owner refreshes its heartbeat this often; a run whose
    # heartbeat is older than ``maintenance_stale_s`` lost its owner and is taken over.
    maintenance_heartbeat_s: float = 10.0
    maintenance_stale_s: float = 60.0
    # Metrics months a retention run archives at once, each on a connection of its own
    # (1 is gentlest on a database that shares its cores with ingestion).
    retention_streams: int = 3
    # How long a dlq command holds the dead letters it read (extended while it works);
    # what a crashed command held comes back this long after it died.
    dlq_lease_s: float = 60.0
    port: int = 8080
    push_audience: str | None = None
    push_service_accounts: tuple[str, ...] = field(default_factory=tuple)
    push_auth: str = "required"

    def __post_init__(self) -> None:
        for attribute, variable in _TIMEOUT_VARIABLES.items():
            value = getattr(self, attribute)
            # 0 means "no timeout" to asyncpg and to PostgreSQL: refused, never infinite.
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{variable} must be a positive number of seconds, got {value}")
        for attribute in _RETENTION_ATTRIBUTES:
            # 0 would expire every event and archive every row.
            if getattr(self, attribute) < 1:
                variable = attribute.upper()
                raise ValueError(
                    f"{variable} must be at least 1 day, got {getattr(self, attribute)}"
                )
        if not 1 <= self.retention_streams <= 8:
            raise ValueError(f"RETENTION_STREAMS must be 1 to 8, got {self.retention_streams}")
        if self.dlq_lease_s < 10:  # Pub/Sub's shortest ack deadline
            raise ValueError(f"DLQ_LEASE must be at least 10 seconds, got {self.dlq_lease_s}")
        if self.maintenance_stale_s < 2 * self.maintenance_heartbeat_s:
            # A live owner must never look dead between two of its heartbeats.
            raise ValueError(
                "MAINTENANCE_STALE_AFTER must be at least twice MAINTENANCE_HEARTBEAT, got "
                f"{self.maintenance_stale_s} and {self.maintenance_heartbeat_s}"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        push_auth = env.get("PUSH_AUTH", "required")
        if push_auth not in ("required", "disabled"):
            raise ValueError(f"PUSH_AUTH must be 'required' or 'disabled', got {push_auth!r}")
        accounts = tuple(
            a.strip() for a in env.get("PUSH_SERVICE_ACCOUNTS", "").split(",") if a.strip()
        )
        return cls(
            database_url=env.get("DATABASE_URL") or DEFAULT_DATABASE_URL,
            database_pool_size=_int(env, "DATABASE_POOL_SIZE", 10),
            database_max_overflow=_int(env, "DATABASE_MAX_OVERFLOW", 20),
            database_pool_timeout_s=_int(env, "DATABASE_POOL_TIMEOUT", 30),
            database_connect_timeout_s=_seconds(env, "DATABASE_CONNECT_TIMEOUT", 10.0),
            database_command_timeout_s=_seconds(env, "DATABASE_COMMAND_TIMEOUT", 30.0),
            database_statement_timeout_s=_seconds(env, "DATABASE_STATEMENT_TIMEOUT", 30.0),
            redis_url=env.get("REDIS_URL") or "redis://127.0.0.1:6379/0",
            redis_max_connections=_int(env, "REDIS_MAX_CONNECTIONS", 50),
            google_cloud_project=env.get("GOOGLE_CLOUD_PROJECT") or "utxoiq-local",
            pubsub_emulator_host=env.get("PUBSUB_EMULATOR_HOST") or None,
            backup_url=env.get("BACKUP_URL") or "file://./var/backups",
            archive_url=env.get("ARCHIVE_URL") or "file://./var/archive",
            backup_retention_days=_int(env, "BACKUP_RETENTION_DAYS", 7),
            metrics_retention_days=_int(env, "METRICS_RETENTION_DAYS", 90),
            feedback_retention_days=_int(env, "FEEDBACK_RETENTION_DAYS", 730),
            backfill_retention_days=_int(env, "BACKFILL_RETENTION_DAYS", 180),
            pg_bin_dir=env.get("PG_BIN_DIR") or None,
            maintenance_heartbeat_s=_seconds(env, "MAINTENANCE_HEARTBEAT", 10.0),
            maintenance_stale_s=_seconds(env, "MAINTENANCE_STALE_AFTER", 60.0),
            retention_streams=_int(env, "RETENTION_STREAMS", 3),
            dlq_lease_s=_seconds(env, "DLQ_LEASE", 60.0),
            port=_int(env, "PORT", 8080),
            push_audience=env.get("PUSH_AUDIENCE") or None,
            push_service_accounts=accounts,
            push_auth=push_auth,
        )
