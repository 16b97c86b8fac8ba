"""The one exception hierarchy of the worker.

The runtime maps every failure to one of two actions: a *permanent* error can never
succeed, so its message is dead-lettered and acked; a *transient* error may succeed
later, so its message is nacked and Pub/Sub redelivers it. Driver errors are
translated into these at the storage boundary (``worker.storage.database.translate``).
A request that can never be accepted (``RequestRefusedError``) is neither: it is
answered 4xx and never reaches a pipeline.
"""

from __future__ import annotations

from typing import ClassVar


class WorkerError(Exception):
    """Root of every error the worker raises on purpose."""

    transient: ClassVar[bool] = False


class PermanentError(WorkerError):
    """The message can never be applied: dead-letter it with ``reason``.

    ``reason`` is one of CONTRACT.md's dead-letter reasons; ``detail`` names the
    offending field and is cut to 1024 characters.
    """

    reason: ClassVar[str] = "schema_violation"

    def __init__(self, detail: str) -> None:
        self.detail = detail[:1024]
        super().__init__(self.detail)


class TooLargeError(PermanentError):
    reason = "too_large"


class InvalidEncodingError(PermanentError):
    reason = "invalid_encoding"


class InvalidJsonError(PermanentError):
    reason = "invalid_json"


class SchemaViolationError(PermanentError):
    reason = "schema_violation"


class ExpiredError(PermanentError):
    """An event older than its table's retention window: applying it would recreate a
    row that retention archived (CONTRACT.md, Retention and archives)."""

    reason = "expired"


class DatabaseError(WorkerError):
    """Any failure of the database layer."""


class DatabaseUnavailableError(DatabaseError):
    """The database is unreachable, the pool is exhausted, or a call timed out."""

    transient = True


class QueryError(DatabaseError):
    """A statement failed for a reason other than the data (a bug, a lock, a cancel).

    Transient: serialization failures, deadlocks and cancellations succeed on retry,
    and a genuine bug reaches the dead-letter topic after Pub/Sub's five attempts.
    """

    transient = True


class MissingPartitionError(QueryError):
    """A row's month has no partition yet (old data, far data, or retention dropped it).

    Transient: the writer creates the partition and writes the batch again.
    """


class IntegrityError(DatabaseError, PermanentError):
    """The data breaks a constraint of the schema."""

    reason = "schema_violation"

    def __init__(self, detail: str) -> None:
        PermanentError.__init__(self, detail)


class ConflictError(IntegrityError):
    """An event disagrees with what is stored (a backfill job's fixed fields)."""

    reason = "conflict"


class NotFoundError(DatabaseError):
    """The row asked for does not exist."""


class ValidationError(DatabaseError, PermanentError):
    """A value was refused by the schema of a payload or by the database."""

    reason = "schema_violation"

    def __init__(self, detail: str) -> None:
        PermanentError.__init__(self, detail)


class PubSubError(WorkerError):
    """A Pub/Sub call failed (unavailable, deadline, quota): try again later."""

    transient = True


class RequestRefusedError(WorkerError):
    """The request can never be accepted: answered 4xx, never retried as it is.

    Raised only at the HTTP edge, before a message reaches a pipeline, so no
    ``except WorkerError`` of the pipelines or the read routes ever meets one.
    """


class EnvelopeError(RequestRefusedError, ValueError):
    """400: the body is not a Pub/Sub push envelope.

    Still a ``ValueError``, as it was before it joined the hierarchy.
    """


class AuthError(RequestRefusedError):
    """401: no token, or a token that is not valid. The message is client-safe."""


class ForbiddenError(RequestRefusedError):
    """403: a valid token of an identity that may not push. The message is client-safe."""


class ObjectStoreError(WorkerError):
    """An object store call failed (Cloud Storage unavailable, a disk error): retry later."""

    transient = True


class ObjectNotFoundError(ObjectStoreError):
    """The object asked for does not exist."""

    transient = False


class ObjectExistsError(ObjectStoreError):
    """An object was to be created where one exists already (never overwritten unasked)."""

    transient = False


class DeadLetterCommandError(WorkerError):
    """A dead-letter command refused before it changed anything (a bad replay file, an
    unknown dead letter named)."""


class MaintenanceError(WorkerError):
    """A maintenance run (backup, restore, retention) failed: its message is nacked, so
    Pub/Sub retries the run and dead-letters it after its attempts. The message says
    what failed and what an operator can do."""

    transient = True


class StartupError(WorkerError):
    """The process cannot start as configured (e.g. its port is taken)."""
