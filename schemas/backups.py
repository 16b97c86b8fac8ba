"""The backup manifest: written beside each dump, last (CONTRACT.md, Backups)."""

from __future__ import annotations

from datetime import datetime

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field


class Verification(BaseModel):
    """The verification restore: the dump read back, hashed, restored and counted."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    passed: bool
    checked_at: AwareDatetime
    seconds: float
    error: str | None = None


class BackupManifest(BaseModel):
    """What a dump holds and whether restoring it was proven to work."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    format: int = 1
    object: str = Field(description="URI of the dump this manifest describes")
    database: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)
    server_version: str
    pg_dump_major: int
    alembic_revision: str | None
    rows: dict[str, int]
    started_at: AwareDatetime
    finished_at: AwareDatetime
    verification: Verification
    run: str | None = Field(default=None, description="the maintenance run that took it")

    @property
    def verified(self) -> bool:
        return self.verification.passed

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())


def parse_manifest(data: bytes) -> BackupManifest:
    return BackupManifest.model_validate_json(data)


def render_manifest(manifest: BackupManifest) -> bytes:
    return manifest.model_dump_json(indent=2).encode() + b"\n"


def utc_stamp(moment: datetime) -> str:
    """``YYYYMMDDTHHMMSSZ``, the time in a dump's name."""
    return moment.strftime("%Y%m%dT%H%M%SZ")
