"""The object store: where backups and archives go (``gs://bucket/prefix`` or ``file://path``).

One small interface with two implementations (``worker.storage.object_files`` and
``worker.storage.object_gcs``), chosen by the URL's scheme in ``open_store``. Keys
are ``/``-separated paths relative to the store's root. Every write streams (memory
stays bounded whatever the object's size) and is all or nothing: an object becomes
visible, whole, only when its ``create`` block exits without an exception; an
exception cancels it and nothing is ever listed or readable under its key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

READ_CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class ObjectInfo:
    """A committed object: its key, size and last modification (UTC)."""

    key: str
    size_bytes: int
    updated_at: datetime


class ObjectWriter(Protocol):
    async def write(self, chunk: bytes) -> None:
        """Append ``chunk`` (kept only if the ``create`` block ends without an exception)."""
        ...


class ObjectStore(Protocol):
    @property
    def url(self) -> str:
        """The store's root, as configured (``gs://bucket/prefix``, ``file:///abs/path``)."""
        ...

    def uri(self, key: str) -> str:
        """The full URI of ``key`` (what operators see and pass back)."""
        ...

    def key_of(self, uri: str) -> str:
        """The key of a URI of this store; ``ValueError`` if it lies outside the store."""
        ...

    def create(
        self, key: str, *, overwrite: bool = False
    ) -> AbstractAsyncContextManager[ObjectWriter]:
        """Stream a new object to ``key``: visible only once the block exits cleanly.

        Raises ``ObjectExistsError`` (at the latest on exit) if ``key`` exists and
        ``overwrite`` is false; an exception inside the block cancels the object.
        """
        ...

    def read(self, key: str, chunk_bytes: int = READ_CHUNK_BYTES) -> AsyncIterator[bytes]:
        """The object's bytes in chunks; ``ObjectNotFoundError`` if it does not exist."""
        ...

    async def read_bytes(self, key: str) -> bytes:
        """A small object whole (a manifest); ``ObjectNotFoundError`` if it does not exist."""
        ...

    async def write_bytes(self, key: str, data: bytes, *, overwrite: bool = False) -> None:
        """A small object in one call, with ``create``'s guarantees."""
        ...

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Committed objects whose key starts with ``prefix``, sorted by key."""
        ...

    async def delete(self, key: str) -> None:
        """Delete ``key``; deleting what does not exist is not an error."""
        ...

    def close(self) -> None:
        """Release connections (a later call opens new ones)."""
        ...

    async def sweep_incomplete(self, prefix: str, older_than: datetime) -> int:
        """Remove what interrupted writes under ``prefix`` left before ``older_than``.

        Never touches a committed object, nor a write younger than ``older_than`` (it
        may be in progress). Returns how many leftovers went.
        """
        ...


def check_key(key: str) -> str:
    """``key`` if it is a valid object key, else ``ValueError``.

    A key is ``/``-separated, relative, without empty segments, and no segment
    starts with ``.`` (so no ``..``): it can never leave the store's root.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"an object key is a non-empty string, got {key!r}")
    if "\x00" in key or "\\" in key:
        raise ValueError(f"an object key has no NUL or backslash, got {key!r}")
    for segment in key.split("/"):
        if not segment or segment.startswith("."):
            raise ValueError(
                f"an object key is relative, with no empty segment and no segment "
                f"starting with '.', got {key!r}"
            )
    return key


def check_prefix(prefix: str) -> str:
    """``prefix`` if it can start a valid key (``""`` is every key), else ``ValueError``.

    Its whole segments follow ``check_key``; its last, partial segment may be empty.
    """
    head, _, _ = prefix.rpartition("/")
    if head or prefix.startswith("/"):
        check_key(head)
    if "\x00" in prefix or "\\" in prefix:
        raise ValueError(f"a key prefix has no NUL or backslash, got {prefix!r}")
    return prefix


def utc_cutoff(older_than: datetime) -> datetime:
    """``older_than`` if it is timezone-aware (a naive time is ambiguous), else ``ValueError``."""
    if older_than.tzinfo is None or older_than.utcoffset() is None:
        raise ValueError(f"older_than must be timezone-aware, got {older_than!r}")
    return older_than


def open_store(url: str) -> ObjectStore:
    """The store for ``url``: ``gs://bucket[/prefix]`` or ``file://path`` (relative or absolute)."""
    if url.startswith("gs://"):
        from worker.storage.object_gcs import GcsStore

        return GcsStore.from_url(url)
    if url.startswith("file://"):
        from worker.storage.object_files import FileStore

        return FileStore.from_url(url)
    raise ValueError(f"an object store URL is gs://bucket/prefix or file://path, got {url!r}")
