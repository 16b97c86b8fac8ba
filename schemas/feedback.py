"""``feedback`` payload and the ``FeedbackStats`` read model."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

from pydantic import Field, StrictInt, model_validator

from schemas.common import Payload, Response, StorableText, Timestamp

FlagType = Literal["inaccurate", "misleading", "spam", "other"]
FLAG_TYPES: tuple[FlagType, ...] = ("inaccurate", "misleading", "spam", "other")

Identifier = Annotated[StorableText, Field(min_length=1, max_length=100)]


class FeedbackEvent(Payload):
    insight_id: Identifier
    user_id: Identifier
    rating: Annotated[StrictInt, Field(ge=1, le=5)] | None = None
    comment: Annotated[StorableText, Field(max_length=5000)] | None = None
    flag_type: FlagType | None = None
    flag_reason: Annotated[StorableText, Field(max_length=2000)] | None = None
    occurred_at: Timestamp
    event_id: UUID | None = None

    @model_validator(mode="after")
    def _consistent(self) -> FeedbackEvent:
        if self.flag_reason is not None and self.flag_type is None:
            raise ValueError("flag_reason is only allowed with a flag_type")
        if self.rating is None and self.comment is None and self.flag_type is None:
            raise ValueError("at least one of rating, comment, flag_type is required")
        return self


class FeedbackRecord(Response):
    """One stored feedback row, as ``list_feedback`` returns it."""

    insight_id: str
    user_id: str
    rating: int | None
    comment: str | None
    flag_type: FlagType | None
    flag_reason: str | None
    created_at: datetime
    updated_at: datetime


class FeedbackStats(Response):
    insight_id: str
    total_ratings: int
    average_rating: float
    rating_distribution: dict[int, int]
    total_comments: int
    total_flags: int
    flag_types: dict[str, int]
