"""Scenario ``backup``: ``utxoiq-worker backup run`` and ``backup restore`` on 2 GB.

The data (``bench.backup_data``): over 2 GB of rows, built once and kept. MB are MiB. Figures (once
each, with their baselines, in one run; a checkpoint before every timed part):
- ``database_mb``: the rows' size, as above;
- ``backup_mb_per_s``: size_bytes / seconds of the worker's "backup dumped", against
  ``pg_dump_devnull_mb_per_s``: ``pg_dump -Fc`` piped into a reader that only counts
  (1 MiB pipe and reads), output bytes over wall time from start to exit: the dump
  with no store behind it. Goal: ratio >= 0.8. The cache is warm for both: an
  untimed ``pg_dump -Fc -f`` (the restore baseline's file) runs first;
- ``verify_s``: seconds of "backup verified" (restore into a scratch database);
- ``peak_rss_mb``: of ``backup run``, the largest of the worker and its children
  (pg_dump, pg_restore), each its own high-water mark (``bench.stack.TreePeakRss``).
  Goal: <= 150 MB;
- ``restore_mb_per_s``: size_bytes / seconds of "backup restored" (``backup restore
  --latest --jobs 2`` into an empty database), against ``pg_restore_local_mb_per_s``:
  ``pg_restore -j 2`` of the local file into another, its bytes over wall time.
``python -m bench.backup --baselines-only``: the data, database_mb and the baselines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from bench import common
from bench.backup_data import DATABASE, MIB, ensure_data, say
from bench.common import _as_admin, _drop, asyncpg_dsn, report, scratch_settings
from bench.stack import TreePeakRss
from worker.cli.main import run_async
from worker.config import Settings

SCENARIO = "backup"
JOBS = 2  # --jobs of both restores


def dump_to_counter(dsn: str) -> tuple[int, float]:
    """``pg_dump -Fc`` into a reader that only counts: its output bytes, its wall time."""
    buffer, size, started = bytearray(MIB), 0, time.perf_counter()
    pipes: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    with subprocess.Popen(["pg_dump", "-Fc", "-d", dsn], pipesize=MIB, **pipes) as process:
        assert process.stdout is not None
        while count := os.readv(process.stdout.fileno(), [buffer]):
            size += count
        _, errors = process.communicate()
    seconds = time.perf_counter() - started
    if process.returncode:
        raise RuntimeError(f"pg_dump exited {process.returncode}: {errors.decode()[-2000:]}")
    return size, seconds


def run_tool(*args: str) -> float:
    """Run a client tool (pg_dump, pg_restore); its wall time. Fails on an error."""
    started = time.perf_counter()
    result = subprocess.run(args, capture_output=True, check=False)
    seconds = time.perf_counter() - started
    if result.returncode:
        raise RuntimeError(f"{args[0]} exited {result.returncode}: {result.stderr[-2000:]!r}")
    return seconds


async def empty_database(name: str) -> Settings:
    """Database ``name`` dropped and created empty (dropped by cleanup), and a checkpoint."""
    if name not in common.DATABASES:
        common.DATABASES.append(name)
    await _as_admin(_drop(name), f'CREATE DATABASE "{name}"', "CHECKPOINT")
    return scratch_settings(name)


async def measure_baselines(settings: Settings, directory: Path) -> tuple[float, float]:
    """``pg_dump`` into a counter, then ``pg_restore`` of a local file: their MB/s."""
    dsn, dump_file = asyncpg_dsn(settings), directory / "baseline.dump"
    seconds = await asyncio.to_thread(run_tool, "pg_dump", "-Fc", "-f", str(dump_file), "-d", dsn)
    file_bytes = dump_file.stat().st_size
    await _as_admin("CHECKPOINT")
    dump_bytes, dump_s = await asyncio.to_thread(dump_to_counter, dsn)
    say(f"pg_dump -Fc: {file_bytes / MIB:.0f} MB, -f {seconds:.1f} s, to a counter {dump_s:.1f} s")
    target = asyncpg_dsn(await empty_database(f"{DATABASE}_pg_restore"))
    restore = [f"--jobs={JOBS}", "--exit-on-error", "-d", target, str(dump_file)]
    seconds = await asyncio.to_thread(run_tool, "pg_restore", *restore)
    say(f"pg_restore -j {JOBS}: {file_bytes / MIB:.0f} MB in {seconds:.1f} s")
    await _as_admin(_drop(f"{DATABASE}_pg_restore"))
    return dump_bytes / MIB / dump_s, file_bytes / MIB / seconds


@dataclass(frozen=True)
class WorkerRun:
    """A finished ``utxoiq-worker`` command: its log events by message, its peak RSS."""

    events: dict[str, dict[str, Any]]
    peak_rss_mb: float
    tail: str

    def event(self, message: str) -> dict[str, Any]:
        if message not in self.events:
            raise RuntimeError(f"no {message!r} event logged; stderr's tail:\n{self.tail}")
        return self.events[message]

    def rate(self, message: str) -> float:
        event = self.event(message)
        return float(event["size_bytes"]) / MIB / float(event["seconds"])


def run_worker(env: dict[str, str], *args: str) -> WorkerRun:
    """``python -m worker ARGS`` to its end; fails with stderr's tail on an error. Its
    peak RSS is the largest of it and its children (``TreePeakRss``)."""
    command = [sys.executable, "-m", "worker", *args]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    events: dict[str, dict[str, Any]] = {}
    tail: deque[str] = deque(maxlen=40)

    def watch() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            tail.append(line.decode("utf-8", "replace"))
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and isinstance(entry.get("message"), str):
                    events[entry["message"]] = entry

    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    with TreePeakRss(process.pid) as peak:
        process.wait()
    reader.join()
    run = WorkerRun(events, peak.mb, "".join(tail))
    if process.returncode:
        raise RuntimeError(f"{' '.join(command[1:])} exited {process.returncode}:\n{run.tail}")
    return run


async def measure_worker(settings: Settings, store: Path) -> tuple[WorkerRun, WorkerRun]:
    """``backup run`` into ``store``, then ``backup restore --latest`` from it."""
    env = {**os.environ, "DATABASE_URL": settings.database_url, "LOG_LEVEL": "INFO"}
    env["BACKUP_URL"] = store.as_uri()
    # The bench database outlives runs: forget its earlier runs, or today's would be
    # "already done" and measure nothing.
    conn = await asyncpg.connect(asyncpg_dsn(settings))
    try:
        await conn.execute("DELETE FROM maintenance_runs")
    finally:
        await conn.close()
    await _as_admin("CHECKPOINT")
    backup = await asyncio.to_thread(run_worker, env, "backup", "run")
    say(f"backup run: {backup.rate('backup dumped'):.1f} MB/s, {backup.peak_rss_mb:.0f} MB RSS")
    target = (await empty_database(f"{DATABASE}_worker_restore")).database_url
    restore_args = ["backup", "restore", "--latest", "--to", target, "--jobs", str(JOBS)]
    restore = await asyncio.to_thread(run_worker, env, *restore_args)
    await _as_admin(_drop(f"{DATABASE}_worker_restore"))
    return backup, restore


async def run(baselines_only: bool = False) -> None:
    settings, size_mb = await ensure_data()
    report(SCENARIO, "database_mb", size_mb)
    with tempfile.TemporaryDirectory(prefix="utxoiq-bench-backup-") as directory:
        dump, restore = await measure_baselines(settings, Path(directory))
        if baselines_only:
            report(SCENARIO, "pg_dump_devnull_mb_per_s", dump)
            report(SCENARIO, "pg_restore_local_mb_per_s", restore)
            return
        worker, restored = await measure_worker(settings, Path(directory) / "store")
    rate = worker.rate("backup dumped")
    report(SCENARIO, "backup_mb_per_s", rate, "pg_dump_devnull_mb_per_s", dump)
    if "backup verified" in worker.events:
        report(SCENARIO, "verify_s", float(worker.event("backup verified")["seconds"]))
    report(SCENARIO, "peak_rss_mb", worker.peak_rss_mb)
    rate = restored.rate("backup restored")
    report(SCENARIO, "restore_mb_per_s", rate, "pg_restore_local_mb_per_s", restore)


async def _baselines_only() -> None:
    try:
        await run(baselines_only=True)
    finally:
        await common.drop_databases()


if __name__ == "__main__":
    if sys.argv[1:] != ["--baselines-only"]:
        raise SystemExit("usage: python -m bench.backup --baselines-only")
    run_async(_baselines_only())
