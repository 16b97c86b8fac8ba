"""The object store on Cloud Storage: ``gs://bucket/prefix``.

Over google-cloud-storage's synchronous client, each call in a worker thread. The
client is built on first use, with ``GOOGLE_CLOUD_PROJECT``'s project and the
environment's credentials; with ``STORAGE_EMULATOR_HOST`` set, the library goes to
that emulator with anonymous credentials.

A write gathers up to ``UPLOAD_CHUNK_BYTES`` in memory. An object that ends within
that goes up in one request; a larger one becomes a resumable upload fed chunk by
chunk, which Cloud Storage makes visible only when it is finalized, and which an
exception cancels. Unless ``overwrite``, every upload carries ``ifGenerationMatch=0``,
so Cloud Storage refuses to replace an object that appeared meanwhile; a resumable
upload also checks for an existing object before it starts, so nothing is streamed
for naught.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from datetime import datetime
from typing import Any, TypeVar

from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions
from google.cloud import storage
from google.cloud.storage import exceptions as storage_exceptions

from worker.exceptions import (
    ObjectExistsError,
    ObjectNotFoundError,
    ObjectStoreError,
    WorkerError,
)
from worker.storage.objects import (
    READ_CHUNK_BYTES,
    ObjectInfo,
    ObjectWriter,
    check_key,
    check_prefix,
    utc_cutoff,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEME = "gs://"
# A multiple of 256 KiB, as resumable uploads require; also the most a write holds
# in memory (plus the caller's chunk).
UPLOAD_CHUNK_BYTES = 8 * 1024 * 1024
CONTENT_TYPE = "application/octet-stream"
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")


def translate(error: BaseException, action: str) -> WorkerError:
    """Map a client library error onto the worker's hierarchy (``action`` says what failed)."""
    if isinstance(error, WorkerError):
        return error
    status = None
    if isinstance(error, api_exceptions.GoogleAPICallError):
        status = error.code
    elif isinstance(error, storage_exceptions.InvalidResponse):
        # Resumable upload chunks raise the media layer's error, not api_core's.
        status = getattr(getattr(error, "response", None), "status_code", None)
    if status == 404:
        return ObjectNotFoundError(f"{action}: not found ({error})")
    if status == 412:
        return ObjectExistsError(f"{action}: the object exists already ({error})")
    return ObjectStoreError(f"{action}: {type(error).__name__}: {error}")


# What the library raises: API errors, retries given up, media errors, credentials
# and transport failures (requests' errors are OSErrors).
_LIBRARY_ERRORS: tuple[type[BaseException], ...] = (
    api_exceptions.GoogleAPIError,
    storage_exceptions.InvalidResponse,
    storage_exceptions.DataCorruption,
    auth_exceptions.GoogleAuthError,
    OSError,
)


async def _call(action: str, work: Callable[[], T]) -> T:
    """``work()`` in a worker thread, library errors translated."""
    try:
        return await asyncio.to_thread(work)
    except _LIBRARY_ERRORS as error:
        raise translate(error, action) from error


class _Upload:
    """One ``create``: a single request for a small object, a resumable upload beyond.

    Its library calls run in worker threads; a lock keeps them in order, so a cancel
    after a cancelled write waits for that write's thread to finish.
    """

    def __init__(self, blob: Any, uri: str, overwrite: bool) -> None:
        self._blob = blob
        self.uri = uri
        self._overwrite = overwrite
        self._precondition: dict[str, int] = {} if overwrite else {"if_generation_match": 0}
        self._lock = threading.Lock()
        self._pending = bytearray()
        self._stream: Any = None  # the BlobWriter, once the object outgrows one chunk
        self._ended = False

    async def write(self, chunk: bytes) -> None:
        if self._ended:
            raise ValueError(f"{self.uri}: write after its create block ended")
        if self._stream is not None:
            await _call(f"writing {self.uri}", lambda: self._send(chunk))
            return
        self._pending += chunk
        if len(self._pending) >= UPLOAD_CHUNK_BYTES:
            data, self._pending = self._pending, bytearray()
            await _call(f"writing {self.uri}", lambda: self._start(data))

    def _start(self, data: bytearray) -> None:
        with self._lock:
            if not self._overwrite and self._blob.exists():
                raise ObjectExistsError(f"{self.uri} exists already")
            self._stream = self._blob.open(
                "wb",
                chunk_size=UPLOAD_CHUNK_BYTES,
                ignore_flush=True,
                content_type=CONTENT_TYPE,
                **self._precondition,
            )
            self._stream.write(data)

    def _send(self, chunk: bytes) -> None:
        with self._lock:
            self._stream.write(chunk)

    async def finish(self) -> None:
        self._ended = True
        data, self._pending = self._pending, bytearray()
        await _call(f"writing {self.uri}", lambda: self._finish(data))

    def _finish(self, tail: bytearray) -> None:
        with self._lock:
            if self._stream is None:
                self._blob.upload_from_string(
                    bytes(tail), content_type=CONTENT_TYPE, **self._precondition
                )
            else:
                self._stream.close()  # the last chunk, and the upload finalized

    def cancel(self) -> None:
        """Cancel the resumable upload, if one started; never raises (the caller's
        error matters). An upload that could not be cancelled stays invisible and
        expires on its own."""
        self._ended = True
        with self._lock:
            if self._stream is None:
                return
            try:
                # What BlobWriter.__exit__ does on an exception: DELETE the session.
                self._stream.terminate()
            except Exception as error:
                log.warning(
                    "could not cancel a resumable upload",
                    extra={"uri": self.uri, "error": repr(error)},
                )


class GcsStore:
    """Objects in one Cloud Storage bucket, under an optional prefix."""

    def __init__(self, bucket: str, prefix: str = "") -> None:
        if not _BUCKET.fullmatch(bucket):
            raise ValueError(f"not a Cloud Storage bucket name: {bucket!r}")
        prefix = prefix.strip("/")
        self._bucket_name = bucket
        self._root = check_key(prefix) + "/" if prefix else ""
        self._url = f"{SCHEME}{bucket}/{prefix}" if prefix else f"{SCHEME}{bucket}"
        self._client_lock = threading.Lock()
        self._client: Any = None

    @classmethod
    def from_url(cls, url: str) -> GcsStore:
        """``gs://bucket`` or ``gs://bucket/prefix`` (a trailing ``/`` is ignored)."""
        if not url.startswith(SCHEME):
            raise ValueError(f"a Cloud Storage URL is gs://bucket/prefix, got {url!r}")
        bucket, _, prefix = url[len(SCHEME) :].partition("/")
        return cls(bucket, prefix)

    @property
    def url(self) -> str:
        return self._url

    @property
    def bucket_name(self) -> str:
        return self._bucket_name

    def uri(self, key: str) -> str:
        return f"{SCHEME}{self._bucket_name}/{self._name(key)}"

    def key_of(self, uri: str) -> str:
        base = f"{SCHEME}{self._bucket_name}/{self._root}"
        if not uri.startswith(base):
            raise ValueError(f"{uri!r} is not in the store {self._url}")
        return check_key(uri[len(base) :])

    def _name(self, key: str) -> str:
        return self._root + check_key(key)

    def client(self) -> Any:
        """The ``storage.Client``, built on first use (call it in a worker thread:
        looking up credentials may do I/O)."""
        with self._client_lock:
            if self._client is None:
                self._client = storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT"))
            return self._client

    def _blob(self, key: str) -> Any:
        return self.client().bucket(self._bucket_name).blob(self._name(key))

    def close(self) -> None:
        """Close the client's HTTP session (a later call builds a new client)."""
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    @asynccontextmanager
    async def create(self, key: str, *, overwrite: bool = False) -> AsyncIterator[ObjectWriter]:
        uri = self.uri(key)
        blob = await _call(f"writing {uri}", lambda: self._blob(key))
        upload = _Upload(blob, uri, overwrite)
        try:
            yield upload
            await upload.finish()
        except BaseException:
            # In a thread too: it waits for a write still running in one (cancelled).
            await asyncio.to_thread(upload.cancel)
            raise

    async def read(self, key: str, chunk_bytes: int = READ_CHUNK_BYTES) -> AsyncIterator[bytes]:
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        action = f"reading {self.uri(key)}"
        name = self._name(key)
        blob = await _call(action, lambda: self.client().bucket(self._bucket_name).get_blob(name))
        if blob is None:
            raise ObjectNotFoundError(f"{action}: not found")
        size: int = blob.size
        # Ranged downloads of the generation just found (get_blob pinned it): memory
        # stays at one chunk, and an object replaced meanwhile is not read half old.
        for start in range(0, size, chunk_bytes):
            end = min(start + chunk_bytes, size) - 1  # inclusive
            fetch = functools.partial(blob.download_as_bytes, start=start, end=end, checksum=None)
            yield await _call(action, fetch)

    async def read_bytes(self, key: str) -> bytes:
        data: bytes = await _call(
            f"reading {self.uri(key)}", lambda: self._blob(key).download_as_bytes()
        )
        return data

    async def write_bytes(self, key: str, data: bytes, *, overwrite: bool = False) -> None:
        async with self.create(key, overwrite=overwrite) as writer:
            await writer.write(data)

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        check_prefix(prefix)

        def scan() -> list[ObjectInfo]:
            found = []
            blobs = self.client().list_blobs(self._bucket_name, prefix=self._root + prefix)
            for blob in blobs:
                key = blob.name[len(self._root) :]
                try:
                    check_key(key)
                except ValueError:
                    continue  # not an object of this store (a folder placeholder, ...)
                found.append(ObjectInfo(key, blob.size, blob.updated))
            return sorted(found, key=lambda info: info.key)

        return await _call(f"listing {SCHEME}{self._bucket_name}/{self._root}{prefix}", scan)

    async def delete(self, key: str) -> None:
        def delete() -> None:
            with suppress(api_exceptions.NotFound):
                self._blob(key).delete()

        await _call(f"deleting {self.uri(key)}", delete)

    async def sweep_incomplete(self, prefix: str, older_than: datetime) -> int:
        """Always 0: an unfinished resumable upload is never visible, takes no key, and
        Cloud Storage expires it on its own (a week after it started)."""
        check_prefix(prefix)
        utc_cutoff(older_than)
        return 0
