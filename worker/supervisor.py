"""Several processes of one command on one listening socket: ``serve`` (and ``run``'s
probes) on every core of the container.

A Python process computes on one core at a time. The supervisor binds the port once
and starts N copies of the same command, each told the socket's file descriptor
(``--listen-fd``): each has its own event loop, pipelines and connection pool, and the
kernel hands each new connection to whichever process accepts it first, so a busy one
takes fewer. The supervisor itself does no request work:

- SIGTERM or SIGINT is passed to every process, and the supervisor waits for all of
  them: each drains as a lone process does (Cloud Run allows 10 s).
- A process that dies after it served is started again; the others go on serving,
  and a connection waiting on the shared socket is never refused meanwhile.
- A process that dies before it served (its start-up failed, and would again) stops
  them all, and the supervisor exits with its code.
- Each process asks the kernel to SIGKILL it when the supervisor dies: a supervisor
  killed outright leaves no process behind holding the port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from worker.exceptions import StartupError

log = logging.getLogger(__name__)

# Past this, a process that has not drained is SIGKILLed (Cloud Run would have killed
# the whole instance 10 s after its SIGTERM anyway).
SHUTDOWN_LIMIT_S = 30.0
BACKLOG = 2048  # uvicorn's default
# A process that died within STABLE_S of its start is restarted after 0, 1, 3, 7, ...
# seconds (at most MAX_RESTART_DELAY_S) the next times in a row.
STABLE_S = 60.0
MAX_RESTART_DELAY_S = 30.0
_PR_SET_PDEATHSIG = 1


def cpu_quota(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may use: the cgroup's CPU quota rounded up (Cloud Run
    and Kubernetes set it), else the CPUs it may run on."""
    cores = len(os.sched_getaffinity(0))
    quota: float | None = None
    with contextlib.suppress(OSError, ValueError):
        limit, period = (cgroup_root / "cpu.max").read_text().split()  # cgroup v2
        if limit != "max":
            quota = int(limit) / int(period)
    if quota is None:
        with contextlib.suppress(OSError, ValueError):  # cgroup v1
            limit_us = int((cgroup_root / "cpu" / "cpu.cfs_quota_us").read_text())
            period_us = int((cgroup_root / "cpu" / "cpu.cfs_period_us").read_text())
            if limit_us > 0:
                quota = limit_us / period_us
    if quota is None:
        return cores
    return max(1, min(cores, math.ceil(quota)))


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: any free port), inheritable by the
    processes started on it; ``StartupError`` when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=BACKLOG)
    except OSError as error:
        raise StartupError(f"cannot listen on {host}:{port}: {error.strerror}") from error
    sock.set_inheritable(True)
    return sock


def die_with_supervisor(supervisor_pid: int) -> None:
    """In a supervised process: be SIGKILLed when the supervisor dies; exit at once if
    it died before this call."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != supervisor_pid:
        os._exit(1)


def report_ready(ready_fd: int | None, sock: socket.socket) -> None:
    """Say that this process serves on ``sock``: to its supervisor through
    ``ready_fd`` (which logs once all do), or in the log when it is alone."""
    if ready_fd is None:
        _log_serving(sock, 1)
        return
    with contextlib.suppress(OSError):  # a supervisor that died: PDEATHSIG follows
        os.write(ready_fd, b"1")
    os.close(ready_fd)


def _log_serving(sock: socket.socket, processes: int) -> None:
    host, port = sock.getsockname()[:2]
    log.info("serving", extra={"host": host, "port": port, "processes": processes})


def restart_delay_s(quick_deaths: int) -> float:
    """How long a process that died ``quick_deaths`` times in a row, each within
    ``STABLE_S`` of its start, waits before it is started again."""
    if quick_deaths <= 1:
        return 0.0
    return min(MAX_RESTART_DELAY_S, 2.0 ** (quick_deaths - 1) - 1)


ServeOne = Callable[[socket.socket, "int | None"], Awaitable[int]]


def add_process_options(parser: argparse.ArgumentParser) -> None:
    """``--processes`` (env WORKER_PROCESSES), and the options a supervised copy is
    started with (hidden: the supervisor sets them)."""
    raw = os.environ.get("WORKER_PROCESSES", "").strip()
    parser.add_argument(
        "--processes",
        type=_processes,
        default=raw or None,  # a string default goes through ``type`` too
        help="processes sharing the port (env WORKER_PROCESSES; default: one per core "
        "of the CPU quota)",
    )
    for hidden in ("--listen-fd", "--ready-fd", "--supervisor-pid"):
        parser.add_argument(hidden, type=int, help=argparse.SUPPRESS)


def _processes(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {raw!r}")
    return value


async def run_on_cores(
    args: argparse.Namespace, host: str, port: int, serve_one: ServeOne, module: str = "worker"
) -> int:
    """``serve_one`` on ``host:port``: here when one process is asked for (or this is a
    supervised copy), else under a ``Supervisor`` of ``args.processes`` copies of
    ``python -m module`` with this process's arguments."""
    if args.listen_fd is not None:
        die_with_supervisor(args.supervisor_pid)
        return await serve_one(socket.socket(fileno=args.listen_fd), args.ready_fd)
    processes = cpu_quota() if args.processes is None else args.processes
    sock = listen(host, port)
    if processes == 1:
        return await serve_one(sock, None)
    return await Supervisor(sys.argv[1:], sock, processes, module).run()


@dataclass
class _Child:
    index: int
    process: asyncio.subprocess.Process
    started_at: float
    served: bool = False


class Supervisor:
    """Runs ``processes`` copies of ``python -m module *command`` on ``sock``; each copy
    gets ``--listen-fd``, ``--ready-fd`` and ``--supervisor-pid`` appended and must
    call ``die_with_supervisor`` and then ``report_ready``."""

    def __init__(
        self, command: Sequence[str], sock: socket.socket, processes: int, module: str = "worker"
    ) -> None:
        if processes < 1:
            raise ValueError(f"processes must be at least 1, got {processes}")
        self._command = [sys.executable, "-m", module, *command]
        self._sock = sock
        self._processes = processes
        self._children: dict[int, _Child] = {}
        self._stopping = asyncio.Event()
        self._failed: int | None = None
        self._announced = False

    async def run(self) -> int:
        """Until SIGTERM or SIGINT (then 0 if every process drained cleanly), or until
        a process fails to start (then its exit code)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)
        watchers = [
            asyncio.create_task(self._keep(index), name=f"process-{index}")
            for index in range(self._processes)
        ]
        try:
            await self._stopping.wait()
            codes = await self._drained(watchers)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            for watcher in watchers:
                watcher.cancel()
            self._sock.close()
        if self._failed is not None:
            return self._failed
        return 0 if all(code == 0 for code in codes) else 1

    async def _drained(self, watchers: list[asyncio.Task[int]]) -> list[int]:
        _, late = await asyncio.wait(watchers, timeout=SHUTDOWN_LIMIT_S)
        for child in self._children.values():
            if child.process.returncode is None:
                log.error(
                    "a process did not drain in time: killing it",
                    extra={"index": child.index, "pid": child.process.pid},
                )
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
        if late:
            await asyncio.wait(late)
        return [watcher.result() for watcher in watchers]

    def _on_signal(self) -> None:
        if not self._stopping.is_set():
            log.info("stop signal received, stopping every process")
        self._stop()

    def _stop(self) -> None:
        self._stopping.set()
        for child in self._children.values():
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)

    async def _keep(self, index: int) -> int:
        """Process ``index``, started again whenever it dies after serving; its last
        exit code once stopping."""
        quick_deaths = 0
        while True:
            child = await self._start(index)
            if self._stopping.is_set():  # the signal came while it was starting
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM)
            code = await child.process.wait()
            if self._stopping.is_set():
                return code
            if not child.served:
                log.error(
                    "a process failed to start: stopping them all",
                    extra={"index": index, "pid": child.process.pid, "exit_code": code},
                )
                self._failed = code if code > 0 else 1
                self._stop()
                return code
            lived_s = time.monotonic() - child.started_at
            quick_deaths = quick_deaths + 1 if lived_s < STABLE_S else 0
            # One that keeps dying soon after it starts waits longer each time (the
            # others serve meanwhile) rather than spinning.
            delay_s = restart_delay_s(quick_deaths)
            log.error(
                "a process died: starting it again",
                extra={
                    "index": index,
                    "pid": child.process.pid,
                    "exit_code": code,
                    "lived_s": round(lived_s, 1),
                    "restart_in_s": delay_s,
                },
            )
            if delay_s:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay_s)
                if self._stopping.is_set():
                    return code

    async def _start(self, index: int) -> _Child:
        ready_r, ready_w = os.pipe()
        fd = self._sock.fileno()
        try:
            process = await asyncio.create_subprocess_exec(
                *self._command,
                "--listen-fd",
                str(fd),
                "--ready-fd",
                str(ready_w),
                "--supervisor-pid",
                str(os.getpid()),
                pass_fds=(fd, ready_w),
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            os.close(ready_w)
        child = _Child(index, process, time.monotonic())
        self._children[index] = child
        asyncio.get_running_loop().add_reader(ready_r, self._on_ready, child, ready_r)
        return child

    def _on_ready(self, child: _Child, ready_r: int) -> None:
        # A byte: the process serves. End of file without one: it died first (its
        # exit is handled by _keep).
        loop = asyncio.get_running_loop()
        loop.remove_reader(ready_r)
        with contextlib.suppress(OSError):
            if os.read(ready_r, 1):
                child.served = True
                log.info("process serving", extra={"index": child.index, "pid": child.process.pid})
        os.close(ready_r)
        started = self._children.values()
        everyone = len(started) == self._processes and all(c.served for c in started)
        if everyone and not self._announced:
            self._announced = True
            _log_serving(self._sock, self._processes)
