"""Google's certificates unavailable: refused, failing or hanging, without the internet.

An outage must cost one fetch, not one per request; every caller gets
``CertsUnavailableError`` (503) within the short fetch timeout, and after a failure
callers fail at once for ``CERTS_RETRY_AFTER_S``. The real fetcher is pointed at a
local HTTP server that answers 503, hangs, drips, or is not there at all.
"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.support.oidc_tokens import (
    AUDIENCE,
    BAD_AUTH,
    SERVICE_ACCOUNT,
    CertSource,
    Clock,
    google_certs,
    valid_authorization,
)
from worker.exceptions import WorkerError
from worker.http.oidc import (
    CERTS_RETRY_AFTER_S,
    AuthError,
    CertCache,
    CertsUnavailableError,
    PushVerifier,
    fetch_google_certs,
    google_certs_fetcher,
)

TIMEOUT_S = 0.3


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    return Clock().install(monkeypatch)


def verifier_of(source: CertSource) -> PushVerifier:
    cache = CertCache(fetch=source.fetch, fetch_timeout_s=TIMEOUT_S)
    return PushVerifier(AUDIENCE, [SERVICE_ACCOUNT], cache)


async def verify_all(verifier: PushVerifier, count: int) -> list[Any]:
    calls = (verifier.verify(valid_authorization()) for _ in range(count))
    return await asyncio.gather(*calls, return_exceptions=True)


# -- the cache during an outage -----------------------------------------------------------


async def test_a_refusing_source_is_certs_unavailable(clock: Clock) -> None:
    source = CertSource(failure=ConnectionRefusedError("connection refused"))
    with pytest.raises(CertsUnavailableError) as raised:
        await verifier_of(source).verify(valid_authorization())
    assert isinstance(raised.value, WorkerError) and raised.value.transient
    assert "refused" not in str(raised.value)  # the detail is logged, not answered


async def test_an_outage_costs_one_fetch_for_200_concurrent_verifications(clock: Clock) -> None:
    source = CertSource(failure=CertsUnavailableError("certificates: HTTP 503"))
    verifier = verifier_of(source)
    results = await verify_all(verifier, 200)
    assert all(isinstance(r, CertsUnavailableError) for r in results), results
    assert source.fetches == 1
    clock.advance(CERTS_RETRY_AFTER_S - 1)  # within the negative cache: no fetch at all
    results = await verify_all(verifier, 200)
    assert all(isinstance(r, CertsUnavailableError) for r in results), results
    assert source.fetches == 1
    clock.advance(1)
    results = await verify_all(verifier, 200)
    assert all(isinstance(r, CertsUnavailableError) for r in results), results
    assert source.fetches == 2


async def test_a_hanging_source_fails_every_caller_within_the_timeout(clock: Clock) -> None:
    source = CertSource(hang=True)
    verifier = verifier_of(source)
    started = time.monotonic()
    results = await verify_all(verifier, 3)
    elapsed_s = time.monotonic() - started
    assert all(isinstance(r, CertsUnavailableError) for r in results), results
    assert TIMEOUT_S * 0.9 <= elapsed_s < 2 * TIMEOUT_S
    assert source.fetches == 1
    # Within the negative cache the next callers do not wait at all.
    started = time.monotonic()
    results = await verify_all(verifier, 3)
    assert all(isinstance(r, CertsUnavailableError) for r in results), results
    assert time.monotonic() - started < TIMEOUT_S / 3
    assert source.fetches == 1


async def test_verification_recovers_once_the_negative_cache_expires(clock: Clock) -> None:
    source = CertSource(hang=True)
    verifier = verifier_of(source)
    with pytest.raises(CertsUnavailableError):
        await verifier.verify(valid_authorization())
    source.hang = False
    with pytest.raises(CertsUnavailableError):
        await verifier.verify(valid_authorization())
    assert source.fetches == 1
    clock.advance(CERTS_RETRY_AFTER_S)
    results = await verify_all(verifier, 50)
    assert all(r.email == SERVICE_ACCOUNT for r in results), results
    assert source.fetches == 2


async def test_a_failed_unknown_kid_refetch_keeps_the_cached_certs(clock: Clock) -> None:
    source = CertSource()
    verifier = verifier_of(source)
    await verifier.verify(valid_authorization())
    source.failure = ConnectionRefusedError()
    clock.advance(61)
    forged = BAD_AUTH["unknown_kid"].header
    with pytest.raises(CertsUnavailableError):
        await verifier.verify(forged())
    assert source.fetches == 2
    # Valid tokens still verify, and more unknown kids fetch nothing during the outage.
    for _ in range(20):
        await verifier.verify(valid_authorization())
        with pytest.raises(AuthError):
            await verifier.verify(forged())
    assert source.fetches == 2


async def test_expired_certs_are_not_served_during_an_outage(clock: Clock) -> None:
    source = CertSource(ttl_s=300)
    verifier = verifier_of(source)
    await verifier.verify(valid_authorization())
    source.failure = ConnectionRefusedError()
    clock.advance(301)
    with pytest.raises(CertsUnavailableError):
        await verifier.verify(valid_authorization())


async def test_a_cancelled_caller_does_not_cancel_the_shared_fetch(clock: Clock) -> None:
    gate = asyncio.Event()
    source = CertSource()

    async def fetch() -> Any:
        await gate.wait()
        return await source.fetch()

    verifier = PushVerifier(AUDIENCE, [SERVICE_ACCOUNT], CertCache(fetch=fetch))
    first = asyncio.create_task(verifier.verify(valid_authorization()))
    second = asyncio.create_task(verifier.verify(valid_authorization()))
    await asyncio.sleep(0.01)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    gate.set()
    assert (await second).email == SERVICE_ACCOUNT
    assert source.fetches == 1


async def test_a_failed_fetch_nobody_awaits_is_not_reported(clock: Clock) -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        gate = asyncio.Event()

        async def fetch() -> Any:
            await gate.wait()
            raise ConnectionRefusedError

        cache = CertCache(fetch=fetch)
        callers = [asyncio.create_task(cache.certs(None)) for _ in range(3)]
        await asyncio.sleep(0.01)
        for caller in callers:
            caller.cancel()
        await asyncio.gather(*callers, return_exceptions=True)
        gate.set()
        await asyncio.sleep(0.01)
        del callers, caller
        gc.collect()
    finally:
        loop.set_exception_handler(previous)
    assert reported == []
    with pytest.raises(CertsUnavailableError):  # and the failure is negatively cached
        await cache.certs(None)


# -- the real fetcher against a local HTTP server -----------------------------------------


class Handler(BaseHTTPRequestHandler):
    release: threading.Event

    def do_GET(self) -> None:
        if self.path == "/certs":
            body = json.dumps(google_certs()).encode()
            self.send_response(200)
            self.send_header("Cache-Control", "public, max-age=1234, must-revalidate")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/503":
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/not-json":
            self.send_response(200)
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"nope")
        elif self.path == "/hang":
            self.release.wait(10)
        elif self.path == "/drip":  # each byte within the read timeout, the whole never
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            while not self.release.wait(TIMEOUT_S / 4):
                self.wfile.write(b" ")
                self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    release = threading.Event()
    handler = type("BoundHandler", (Handler,), {"release": release})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/certs"


async def test_the_fetcher_reads_the_certs_and_their_max_age(server: str) -> None:
    certs, ttl_s = await fetch_google_certs(f"{server}/certs", timeout_s=2)
    assert set(certs) == set(google_certs())  # a fresh certificate each time: same kid
    assert ttl_s == 1234


@pytest.mark.parametrize("path", ["/503", "/not-json", "/hang", "/drip", "closed port"])
async def test_the_fetcher_fails_within_its_timeout(server: str, path: str) -> None:
    url = closed_port_url() if path == "closed port" else server + path
    started = time.monotonic()
    with pytest.raises(CertsUnavailableError):
        await google_certs_fetcher(url, timeout_s=TIMEOUT_S)()
    assert time.monotonic() - started < 2 * TIMEOUT_S


async def test_a_verifier_on_the_real_fetcher(server: str) -> None:
    working = CertCache(fetch=google_certs_fetcher(f"{server}/certs", timeout_s=2))
    verifier = PushVerifier(AUDIENCE, [SERVICE_ACCOUNT], working)
    assert (await verifier.verify(valid_authorization())).email == SERVICE_ACCOUNT
    hanging = CertCache(fetch=google_certs_fetcher(f"{server}/hang", timeout_s=TIMEOUT_S))
    verifier = PushVerifier(AUDIENCE, [SERVICE_ACCOUNT], hanging)
    started = time.monotonic()
    results = await asyncio.gather(
        *(verifier.verify(valid_authorization()) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, CertsUnavailableError) for r in results), results
    assert time.monotonic() - started < 2 * TIMEOUT_S
