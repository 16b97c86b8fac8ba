"""``backfill-progress`` payload and the ``BackfillJobResponse`` read model."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal
from uuid import UUID

from pydantic import Field, PlainSerializer, StrictInt, model_validator

from schemas.common import Payload, Response, StorableText, Timestamp

Percentage = Annotated[Decimal, PlainSerializer(float, return_type=float, when_used="json")]
"""Exact in Python (``numeric(5,2)``), a JSON number on the wire: a client expects
``50.0``, not the string ``"50.00"`` pydantic writes for a Decimal."""

MAX_BLOCK = 2_147_483_647

BackfillStatus = Literal["running", "paused", "completed", "failed"]
Block = Annotated[StrictInt, Field(ge=0, le=MAX_BLOCK)]


class BackfillProgressEvent(Payload):
    job_id: UUID
    job_type: Annotated[StorableText, Field(min_length=1, max_length=50)]
    start_block: Block
    end_block: Block
    current_block: Block
    status: BackfillStatus
    error_message: Annotated[StorableText, Field(max_length=10_000)] | None = None
    estimated_completion: Timestamp | None = None
    created_by: Annotated[StorableText, Field(max_length=100)] | None = None
    occurred_at: Timestamp

    @model_validator(mode="after")
    def _blocks_in_order(self) -> BackfillProgressEvent:
        if not self.start_block <= self.current_block <= self.end_block:
            raise ValueError(
                "blocks must satisfy start_block <= current_block <= end_block "
                f"(got {self.start_block}, {self.current_block}, {self.end_block})"
            )
        return self


class BackfillJobResponse(Response):
    job_id: UUID
    job_type: str
    start_block: int
    end_block: int
    current_block: int
    status: BackfillStatus
    progress_percentage: Percentage
    estimated_completion: datetime | None
    error_message: str | None
    started_at: datetime
    completed_at: datetime | None
    created_by: str | None
