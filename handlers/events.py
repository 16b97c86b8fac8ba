"""What every handler shares: validation, canonical JSON and an event's order key."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, Protocol, TypeVar, cast

import orjson
from pydantic import BaseModel, TypeAdapter
from pydantic import ValidationError as PydanticValidationError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from worker.exceptions import ExpiredError, SchemaViolationError
from worker.pipeline.handler import BatchOutcome
from worker.storage.database import transaction

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


def event_key(event: BaseModel) -> bytes:
    """A deterministic tie-breaker between two events of the same ``occurred_at``.

    Equal events have equal keys, so a duplicate never wins against itself and the
    outcome never depends on arrival order.
    """
    # The field values as they are: the payload models are flat (scalars only), so
    # this is model_dump()'s dict without its copy, computed for every event of a
    # batch. default=str: a UUID subclass (asyncpg's, from a row read back) gives the
    # same text as uuid.UUID, which orjson only serialises for the exact type.
    encoded = orjson.dumps(vars(event), option=orjson.OPT_SORT_KEYS, default=str)
    return hashlib.sha256(encoded).digest()


class _Occurred(Protocol):
    @property
    def occurred_at(self) -> datetime: ...


E = TypeVar("E", bound=BaseModel)


BatchWrite = Callable[[AsyncConnection, Sequence[E]], Awaitable[BatchOutcome]]


class EventHandler(Generic[E]):
    """A topic of events that carry ``occurred_at``, each validated into ``model`` and
    refused as ``expired`` once older than ``max_age`` (it would recreate a row that
    retention archived); a batch is written by ``write`` in one transaction."""

    topic: str
    table: str

    def __init__(self, model: type[E], max_age: timedelta, write: BatchWrite[E]) -> None:
        self.model = model
        self.max_age = max_age
        self.write = write

    def parse(self, payload: dict[str, Any], published_at: datetime) -> E:
        event = validate(self.model, payload)
        if cast(_Occurred, event).occurred_at < datetime.now(UTC) - self.max_age:
            raise expired("occurred_at", self.max_age, self.table)
        return event

    async def apply(self, engine: AsyncEngine, items: Sequence[E]) -> BatchOutcome:
        async with transaction(engine) as conn:
            return await self.write(conn, items)


def expired(field: str, max_age: timedelta, table: str) -> ExpiredError:
    """The refusal of a value of ``field`` older than ``table``'s retention window."""
    return ExpiredError(f"{field}: older than the {max_age.days}-day retention window of {table}")


def validate(model: type[M], payload: Any) -> M:
    """Validate a decoded payload; a violation names its first offending field."""
    try:
        return model.model_validate(payload)
    except PydanticValidationError as error:
        raise _violation(error) from None


def validate_fields(adapter: TypeAdapter[T], payload: Any) -> T:
    """``validate`` for a payload checked into plain data (a typed dict)."""
    try:
        return adapter.validate_python(payload)
    except PydanticValidationError as error:
        raise _violation(error) from None


def _violation(error: PydanticValidationError) -> SchemaViolationError:
    problems = []
    for problem in error.errors(include_url=False, include_input=False):
        field = ".".join(str(part) for part in problem["loc"]) or "payload"
        problems.append(f"{field}: {problem['msg']}")
    return SchemaViolationError("; ".join(problems))
