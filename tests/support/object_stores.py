"""Helpers for tests that go through the Cloud Storage emulator (fake-gcs-server,
started by ``deploy/local/with-stack.sh`` when ``STORAGE_EMULATOR_HOST`` is unset).

A missing or unreachable emulator fails the test loudly: it never becomes a skip.
"""

from __future__ import annotations

import asyncio
import os
import urllib.error
import urllib.request
import uuid

import pytest

from worker.storage.object_gcs import GcsStore


def storage_emulator() -> str:
    """The emulator's URL (``http://host:port``); unset or unreachable fails the test."""
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if not host:
        pytest.fail(
            "STORAGE_EMULATOR_HOST is not set: run the tests through "
            "deploy/local/with-stack.sh (`make test` does), which starts fake-gcs-server, "
            "or start one and export STORAGE_EMULATOR_HOST=http://host:port",
            pytrace=False,
        )
    try:
        with urllib.request.urlopen(f"{host}/storage/v1/b", timeout=10) as response:
            response.read()
    except (OSError, urllib.error.URLError) as error:
        pytest.fail(
            f"the Cloud Storage emulator at {host} is not reachable: {error!r}", pytrace=False
        )
    return host


async def fresh_bucket_store(prefix: str = "") -> GcsStore:
    """A store on a new, empty bucket of the emulator, rooted at ``prefix``.

    The caller owns it: ``await drop_bucket(store)`` (or at least ``store.close()``)
    when done with it.
    """
    host = storage_emulator()
    bucket = f"utxoiq-test-{uuid.uuid4().hex[:20]}"
    # Created through a client of its own, closed here: the store returned has built
    # none yet, so a caller that only wants its URL leaves no HTTP session behind.
    admin = GcsStore(bucket)
    try:
        await asyncio.to_thread(lambda: admin.client().create_bucket(bucket))
    except Exception as error:
        pytest.fail(
            f"the Cloud Storage emulator at {host} did not create a bucket: {error!r}",
            pytrace=False,
        )
    finally:
        admin.close()
    return GcsStore(bucket, prefix)


async def drop_bucket(store: GcsStore) -> None:
    """Delete the store's bucket with everything in it (the emulator keeps objects in
    memory until it stops), then close the store."""

    def drop() -> None:
        client = store.client()
        for blob in client.list_blobs(store.bucket_name):
            blob.delete()
        client.bucket(store.bucket_name).delete()

    try:
        await asyncio.to_thread(drop)
    finally:
        store.close()
