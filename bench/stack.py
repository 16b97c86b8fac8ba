"""Pub/Sub and worker-process helpers shared by the ingestion benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import asyncpg

from bench.common import asyncpg_dsn
from handlers import registry
from worker.config import Settings
from worker.pubsub import topology
from worker.pubsub.client import PubSub, PubsubMessage

PUBLISH_BATCH = 1000


def bench_settings(base: Settings) -> Settings:
    """A Pub/Sub project of its own on the emulator: topics start empty every run."""
    if not base.pubsub_emulator_host:
        raise SystemExit("the ingestion benchmarks need PUBSUB_EMULATOR_HOST (run `make bench`)")
    settings = dataclasses.replace(base, google_cloud_project=f"bench-{uuid.uuid4().hex[:10]}")
    PROJECTS.append(settings)
    return settings


PROJECTS: list[Settings] = []
"""Every Pub/Sub project a scenario made; deleted after the scenario (cleanup)."""


async def cleanup() -> None:
    """Delete the scenarios' topics and subscriptions: the emulator frees their messages,
    so one scenario's leftovers do not slow the next one down."""
    while PROJECTS:
        await topology.delete(PROJECTS.pop(), registry())


async def fresh_topology(settings: Settings) -> PubSub:
    await topology.apply(settings, registry())
    return PubSub(settings)


async def publish_all(pubsub: PubSub, topic: str, payloads: Sequence[bytes]) -> None:
    """Publish in requests of 1000, four requests in flight."""
    target = pubsub.topic(topic)
    chunks = [payloads[i : i + PUBLISH_BATCH] for i in range(0, len(payloads), PUBLISH_BATCH)]
    limit = asyncio.Semaphore(4)

    async def send(chunk: Sequence[bytes]) -> None:
        async with limit:
            await pubsub.publish(target, [PubsubMessage(data=d) for d in chunk], timeout_s=120)

    await asyncio.gather(*(send(c) for c in chunks))


def start_worker(
    settings: Settings, *args: str, metrics_to: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start ``utxoiq-worker run``; return once it has started (its imports done).

    Timing starts there: a long-running worker boots once, so boot time is not
    part of how fast it drains. With ``metrics_to``, the worker writes its metrics
    there as it exits (OpenTelemetry's console exporter, one JSON line).
    """
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "GOOGLE_CLOUD_PROJECT": settings.google_cloud_project,
        "LOG_LEVEL": "INFO",
        "PORT": "0",  # its probes on any free port
        "WORKER_PROCESSES": "1",  # the figures are one process's
    }
    stdout: IO[bytes] | int = subprocess.DEVNULL
    if metrics_to is not None:
        # One export, at exit: cumulative since start, and nothing exported meanwhile.
        env.update(OTEL_METRICS_EXPORTER="console", OTEL_METRIC_EXPORT_INTERVAL="86400000")
        stdout = metrics_to.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "run", *args],
        env=env,
        stdout=stdout,
        stderr=subprocess.PIPE,
    )
    if not isinstance(stdout, int):
        stdout.close()  # the child holds its own copy
    started = threading.Event()

    def watch() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            if b'"worker started"' in line:
                started.set()
            elif b'"severity": "INFO"' not in line:
                sys.stderr.write(line.decode("utf-8", "replace"))
        started.set()

    threading.Thread(target=watch, daemon=True).start()
    if not started.wait(timeout=60) or process.poll() is not None:
        raise RuntimeError("the worker did not start")
    return process


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM a worker or server process; kill it if it is not gone in 15 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def peak_rss_mb(pid: int) -> float:
    kib = _hwm_kib(pid)
    if kib is None:
        raise RuntimeError("no VmHWM in /proc status")
    return kib / 1024


def _hwm_kib(pid: int) -> int | None:
    """VmHWM of a live process: the high-water mark of its resident memory since its
    exec; None once it has exited (a zombie has no memory left to report)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return None


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, from each thread's ``children`` list."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        found.append(parent)
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except FileNotFoundError:
            continue
        for task in tasks:
            # A thread or process that ends meanwhile (pg_dump's children do) is gone
            # from /proc, or answers ESRCH: skip it rather than end the sampling.
            with (
                contextlib.suppress(FileNotFoundError, ProcessLookupError),
                open(f"/proc/{parent}/task/{task}/children") as children,
            ):
                todo.extend(int(child) for child in children.read().split())
    return found


class TreePeakRss:
    """The largest VmHWM of a process and its descendants, sampled every ``SAMPLE_S``
    while it runs (``with TreePeakRss(pid) as peak:``, then ``peak.mb``).

    Not ``ru_maxrss`` of ``wait4``: Linux counts into a child's maxrss the memory it was
    forked from (the exec records the address space it leaves, the parent's own under
    vfork), so every child of a benchmark process that had grown to 1.2 GB reported 1.2
    GB. VmHWM is the process's own since its exec. A process's growth in its last
    ``SAMPLE_S`` can be missed."""

    SAMPLE_S = 0.02

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    @property
    def mb(self) -> float:
        return self._peak_kib / 1024

    def __enter__(self) -> TreePeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while True:
            for pid in _descendants(self._pid):
                self._peak_kib = max(self._peak_kib, _hwm_kib(pid) or 0)
            if self._stop.wait(self.SAMPLE_S):
                return


async def wait_for_rows(
    settings: Settings, query: str, expected: int, timeout_s: float = 600
) -> float:
    """Poll until ``query`` counts ``expected``; the monotonic time it did.

    A count scans the table, and the scans share the two cores with what is being
    measured: polls are spaced by a fifth of the time left at the rate seen so far
    (at least 20 ms, at most 500 ms), so the end is still seen within 20 ms.
    """
    conn = await asyncpg.connect(asyncpg_dsn(settings))
    try:
        started = time.monotonic()
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            count = await conn.fetchval(query)
            if count >= expected:
                return time.monotonic()
            elapsed = time.monotonic() - started
            left_s = (expected - count) * elapsed / count if count else 0.5
            await asyncio.sleep(min(0.5, max(0.02, left_s / 5)))
    finally:
        await conn.close()
    raise TimeoutError(f"{query!r} did not reach {expected} in {timeout_s}s")
