"""A throwaway ``redis-server`` on a free loopback port, stopped and started at will.

Nothing is persisted (``--save ""``, no AOF): a restarted server is empty, like a
Memorystore failover without persistence. It comes back on the same port, so the
worker's ``REDIS_URL`` stays valid across the outage.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import time

import redis.asyncio as redis_async
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from tests.faults.postgres import free_port


class RedisServer:
    """``await RedisServer().start()``; ``stop()`` and ``start()`` again on ``port``."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.process: asyncio.subprocess.Process | None = None
        self.output: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    async def start(self, timeout_s: float = 10) -> None:
        """Start the server and wait until it answers PING."""
        if self.running:
            raise RuntimeError(f"redis-server on {self.port} is already running")
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.process = await asyncio.create_subprocess_exec(
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = asyncio.create_task(self._read(self.process))
        # A safety net if pytest exits without the fixture's teardown.
        atexit.register(self._kill_survivor)
        deadline = time.monotonic() + timeout_s
        while not await self.ping():
            if not self.running:
                raise RuntimeError(f"redis-server exited:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer in {timeout_s}s")
            await asyncio.sleep(0.02)

    async def stop(self, *, kill: bool = False, timeout_s: float = 10) -> None:
        """SIGTERM (or SIGKILL with ``kill``) and wait for the exit."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout_s)
        except TimeoutError:
            process.kill()
            await process.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)
        atexit.unregister(self._kill_survivor)

    def _kill_survivor(self) -> None:
        if self.running and self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)

    async def ping(self) -> bool:
        # No retries: "is it up right now?", not redis-py's default 3 tries with backoff.
        client = redis_async.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=1, retry=Retry(NoBackoff(), 0)
        )
        try:
            return bool(await client.ping())
        except (RedisError, OSError):
            return False
        finally:
            await client.aclose()

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.output[-lines:])

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            self.output.append(raw.decode("utf-8", "replace").rstrip("\n"))
