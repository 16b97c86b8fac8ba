"""Worker and push-server subprocesses: ``python -m worker run`` / ``serve``.

Each one gets an explicit environment (``worker_environment``), is ready once it has
logged that it started, keeps every stderr line (JSON log entries) for assertions,
and can be SIGKILLed, SIGTERMed or waited for. ``Processes`` remembers every process
it started and kills whatever still runs when the test ends: no orphans.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from worker.config import Settings

ROOT = Path(__file__).resolve().parents[2]
# Inherited variables that would configure the child behind the test's back.
_NOT_INHERITED_PREFIXES = ("DATABASE_", "REDIS_", "WORKER_", "PUSH_", "OTEL_", "BACKUP_")
_NOT_INHERITED = {"PORT", "GOOGLE_CLOUD_PROJECT", "PUBSUB_EMULATOR_HOST", "HOST", "LOG_LEVEL"}
RUN_READY = "worker started"
# Logged once every process of ``serve`` listens (by the supervisor, or by a lone one).
SERVE_READY = "serving"
LINE_LIMIT_BYTES = 4 * 1024 * 1024


def worker_environment(
    settings: Settings, *, crash_at: str | None = None, **extra: str
) -> dict[str, str]:
    """The child's environment: ``settings`` as variables, ``WORKER_CRASH_AT`` if given,
    then ``extra`` (e.g. ``WORKER_MAX_BATCH_SIZE="100"``); nothing inherited that the
    worker would read as configuration."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _NOT_INHERITED and not key.startswith(_NOT_INHERITED_PREFIXES)
    }
    env.update(
        DATABASE_URL=settings.database_url,
        DATABASE_POOL_SIZE=str(settings.database_pool_size),
        DATABASE_MAX_OVERFLOW=str(settings.database_max_overflow),
        DATABASE_POOL_TIMEOUT=str(settings.database_pool_timeout_s),
        DATABASE_CONNECT_TIMEOUT=str(settings.database_connect_timeout_s),
        DATABASE_COMMAND_TIMEOUT=str(settings.database_command_timeout_s),
        DATABASE_STATEMENT_TIMEOUT=str(settings.database_statement_timeout_s),
        REDIS_URL=settings.redis_url,
        GOOGLE_CLOUD_PROJECT=settings.google_cloud_project,
        LOG_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
    )
    if settings.pubsub_emulator_host:
        env["PUBSUB_EMULATOR_HOST"] = settings.pubsub_emulator_host
    if crash_at:
        env["WORKER_CRASH_AT"] = crash_at
    env.update(extra)
    return env


def gone(pid: int) -> bool:
    """No such process, or only its zombie (it holds no socket any more)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def listeners(port: int) -> dict[int, str]:
    """The processes holding a socket that listens on TCP ``port`` (IPv4 or IPv6):
    pid -> command line. Read from /proc, so it proves what a connect cannot (a
    connect may reach another process that took the port, or the client itself)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # LISTEN
                    inodes.add(f"socket:[{inode}]")
    holders: dict[int, str] = {}
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in inodes for fd in fd_dir.iterdir()):
                cmdline = (fd_dir.parent / "cmdline").read_bytes().replace(b"\0", b" ")
                holders[int(fd_dir.parent.name)] = cmdline.decode(errors="replace").strip()
    return holders


def unshared_port() -> int:
    """A free loopback port below the ephemeral range: no outgoing connection and no
    ``bind(0)`` of another test gets it while a test watches it."""
    low, _ = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for port in random.sample(range(20000, min(low, 32768)), 200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


async def wait_gone(pids: list[int], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(gone(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if not gone(p)]}"
        await asyncio.sleep(0.05)


class WorkerProcess:
    """One ``python -m worker ...`` child and its stderr, line by line."""

    def __init__(self, name: str, process: asyncio.subprocess.Process) -> None:
        self.name = name
        self.process = process
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read(), name=f"stderr-{name}")

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        """None while running; ``-9`` after a SIGKILL (``-signal.SIGKILL``)."""
        return self.process.returncode

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    def entries(self) -> list[dict[str, Any]]:
        """Every stderr line that is a JSON object (all the worker's own lines are)."""
        found = []
        for line in self.lines:
            if line.startswith("{"):
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict):
                    found.append(entry)
        return found

    def logged(self, message: str) -> list[dict[str, Any]]:
        """The JSON entries whose ``message`` is ``message``."""
        return [e for e in self.entries() if e.get("message") == message]

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.lines[-lines:])

    async def wait_for_log(
        self,
        matches: str | Callable[[dict[str, Any]], bool],
        *,
        timeout_s: float = 60,
        allow_exit: bool = False,
    ) -> dict[str, Any]:
        """The first JSON entry with that ``message`` (or that ``matches``); fails if
        the process exits first (unless ``allow_exit``) or after ``timeout_s``."""
        predicate = matches if callable(matches) else (lambda e: e.get("message") == matches)
        deadline = time.monotonic() + timeout_s
        seen = 0
        while True:
            entries = self.entries()
            for entry in entries[seen:]:
                if predicate(entry):
                    return entry
            seen = len(entries)
            if not self.alive and not allow_exit:
                await self._drain()
                if any(predicate(e) for e in self.entries()[seen:]):
                    continue
                raise AssertionError(
                    f"{self.name} exited ({self.returncode}) before logging {matches!r}:\n"
                    f"{self.log_tail()}"
                )
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{self.name} did not log {matches!r} within {timeout_s}s:\n{self.log_tail()}"
                )
            await asyncio.sleep(0.05)

    def served_by(self) -> dict[int, int]:
        """The supervised processes serving now, by index: the pid each last logged
        ``process serving`` with (empty for a lone process)."""
        return {e["index"]: e["pid"] for e in self.logged("process serving")}

    async def kill(self) -> int:
        """SIGKILL (no shutdown of any kind) and wait; the return code (-9)."""
        if self.alive:
            self.process.send_signal(signal.SIGKILL)
        return await self.wait_exit(30)

    async def terminate(self, timeout_s: float = 15) -> int:
        """SIGTERM (the graceful shutdown) and wait; SIGKILL if it takes too long."""
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
        try:
            return await self.wait_exit(timeout_s)
        except TimeoutError:
            return await self.kill()

    async def wait_exit(self, timeout_s: float) -> int:
        """Wait for the exit (TimeoutError after ``timeout_s``); the return code."""
        code = await asyncio.wait_for(self.process.wait(), timeout_s)
        await self._drain()
        return code

    async def _drain(self) -> None:
        # The last lines (a crash point's own warning) arrive just before the exit.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._reader), 5)

    async def _read(self) -> None:
        assert self.process.stderr is not None
        while True:
            try:
                raw = await self.process.stderr.readline()
            except ValueError:  # a line over the limit: keep going with the rest
                continue
            if not raw:
                return
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))


class Processes:
    """Starts worker processes; ``kill_all()`` (the fixture's teardown) kills what runs."""

    def __init__(self) -> None:
        self.started: list[WorkerProcess] = []
        # A safety net for a pytest that exits without its teardown (an interrupt in a
        # fixture): the children live in sessions of their own and would outlive it.
        atexit.register(self._kill_survivors)

    def _kill_survivors(self) -> None:
        for child in self.started:
            if child.alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)

    async def spawn(self, name: str, args: list[str], env: Mapping[str, str]) -> WorkerProcess:
        """Start ``python -m worker *args`` without waiting for it to be ready."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker",
            *args,
            env=dict(env),
            cwd=ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            limit=LINE_LIMIT_BYTES,
            # Its own process group: a signal meant for pytest never reaches it.
            start_new_session=True,
        )
        child = WorkerProcess(name, process)
        self.started.append(child)
        return child

    async def start_worker(
        self,
        env: Mapping[str, str],
        *args: str,
        name: str = "worker",
        ready_timeout_s: float = 60,
    ) -> WorkerProcess:
        """``python -m worker run *args``; returns once it logged ``worker started``."""
        # Its probes on any free port: several workers run side by side. One process
        # unless ``env`` says otherwise: the scenarios follow one process's log.
        child = await self.spawn(
            name, ["run", *args], {"PORT": "0", "WORKER_PROCESSES": "1", **env}
        )
        await child.wait_for_log(RUN_READY, timeout_s=ready_timeout_s)
        return child

    async def start_server(
        self,
        env: Mapping[str, str],
        port: int,
        *,
        name: str = "serve",
        ready_timeout_s: float = 60,
    ) -> WorkerProcess:
        """``python -m worker serve --host 127.0.0.1`` on ``port`` (``PUSH_AUTH=disabled``
        unless ``env`` says otherwise); returns once every one of its processes serves."""
        env = {"PUSH_AUTH": "disabled", **env, "PORT": str(port)}
        child = await self.spawn(name, ["serve", "--host", "127.0.0.1"], env)
        await child.wait_for_log(SERVE_READY, timeout_s=ready_timeout_s)
        return child

    async def kill_all(self) -> None:
        for child in self.started:
            if child.alive:
                await child.kill()
        atexit.unregister(self._kill_survivors)
