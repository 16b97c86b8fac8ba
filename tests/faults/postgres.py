"""A throwaway PostgreSQL cluster: initdb in a temporary folder, a free loopback port.

Stopping it in immediate mode, restarting it or terminating its backends harms nobody
else (the machine's own cluster on 5432 is never touched). initdb refuses to run as
root, so as root every server command runs as the ``postgres`` OS user (Debian's
packages create it); the folder is handed to that user.

Durability is the real thing: ``fsync`` stays on (only initdb's own final sync is
skipped). An immediate stop is a PostgreSQL crash, not an OS crash, so fsync off would
lose nothing here either; it stays on so that a commit means what it means in
production, at the cost of a WAL flush per commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import asyncpg

from tests.support.topics import REGISTRY
from worker.config import Settings
from worker.storage.migrate import upgrade

BIN_ROOT = Path("/usr/lib/postgresql")
SERVER_USER = "postgres"  # initdb's superuser too (-U)
# Folders are named after the pytest process that owns them, so that the next run can
# stop and remove the clusters of a run that died before its teardown.
FOLDER_PREFIX = "utxoiq-faults-pg-"

StopMode = Literal["smart", "fast", "immediate"]


def free_port() -> int:
    """A loopback TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def bin_dir() -> Path:
    """``/usr/lib/postgresql/<highest version>/bin`` (initdb, pg_ctl)."""
    versions = sorted(
        (p for p in BIN_ROOT.glob("*") if p.name.replace(".", "").isdigit()),
        key=lambda p: [int(part) for part in p.name.split(".")],
    )
    for version in reversed(versions):
        if (version / "bin" / "initdb").exists() and (version / "bin" / "pg_ctl").exists():
            return version / "bin"
    raise RuntimeError(f"no PostgreSQL server binaries (initdb, pg_ctl) under {BIN_ROOT}")


def _run_as() -> str | None:
    """The OS user to run server commands as: ``postgres`` when we are root."""
    return SERVER_USER if os.geteuid() == 0 else None


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def _run(args: Sequence[str], *, user: str | None, timeout_s: float = 60) -> str:
    """Run a server command (as ``user``); its output, or RuntimeError with it."""
    # runuser rather than user=: Python must fork (not vfork) to switch users itself,
    # and a fork runs gRPC's at-fork handlers in the child, which crashed it once
    # (SIGSEGV before exec) while the test's gRPC threads were busy.
    command = ["runuser", "-u", user, "--", *args] if user else list(args)
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        # A session of its own: a Ctrl-C meant for pytest does not reach the server.
        start_new_session=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise RuntimeError(f"{' '.join(args)} did not finish in {timeout_s}s") from None
    text = output.decode("utf-8", "replace")
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {process.returncode}:\n{text}")
    return text


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class PostgresCluster:
    """One cluster in its own folder. ``create()`` runs initdb; ``start()`` serves it."""

    def __init__(self, folder: Path, port: int, binaries: Path) -> None:
        self.folder = folder
        self.data = folder / "data"
        self.log_path = folder / "postgres.log"
        self.port = port
        self.binaries = binaries
        self.user = _run_as()
        self.running = False

    # -- lifecycle -----------------------------------------------------------------

    @classmethod
    async def create(cls, parent: Path | None = None) -> PostgresCluster:
        """initdb a new cluster (not started) on a free port."""
        binaries = bin_dir()
        await sweep_orphans(parent)
        folder = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-", dir=parent))
        cluster = cls(folder, free_port(), binaries)
        if cluster.user is not None:
            account = pwd.getpwnam(cluster.user)
            os.chown(folder, account.pw_uid, account.pw_gid)
        await _run(
            [
                str(binaries / "initdb"),
                "-D",
                str(cluster.data),
                "-A",
                "trust",
                "-U",
                SERVER_USER,
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",  # initdb's final sync only; the server keeps fsync on
            ],
            user=cluster.user,
        )
        cluster._configure()
        return cluster

    def _configure(self) -> None:
        # postgresql.auto.conf is read last: these win over postgresql.conf.
        with open(self.data / "postgresql.auto.conf", "a") as conf:
            conf.write(
                f"port = {self.port}\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.folder}'\n"
                "max_connections = 200\n"
                # %a: the application name, to tell the worker's sessions from ours.
                "log_line_prefix = '%m [%p] %a '\n"
            )

    async def start(self, timeout_s: float = 30) -> None:
        """Start the server and wait until it accepts connections."""
        await _run(
            [
                str(self.binaries / "pg_ctl"),
                "start",
                "-D",
                str(self.data),
                "-l",
                str(self.log_path),
                "-w",
                "-t",
                str(int(timeout_s)),
            ],
            user=self.user,
            timeout_s=timeout_s + 10,
        )
        self.running = True

    async def stop(self, mode: StopMode = "fast", timeout_s: float = 30) -> None:
        """Stop the server; ``immediate`` is a crash (recovery at the next start)."""
        await _run(
            [
                str(self.binaries / "pg_ctl"),
                "stop",
                "-D",
                str(self.data),
                "-m",
                mode,
                "-w",
                "-t",
                str(int(timeout_s)),
            ],
            user=self.user,
            timeout_s=timeout_s + 10,
        )
        self.running = False

    async def restart_immediate(self) -> None:
        """Crash the server (every backend dies at once) and start it again."""
        await self.stop("immediate")
        await self.start()

    async def destroy(self) -> None:
        """Stop (immediately, if it runs) and delete the folder."""
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError):
                await self.stop("immediate")
        self.running = False
        shutil.rmtree(self.folder, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text("utf-8", "replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- addresses -----------------------------------------------------------------

    def dsn(self, database: str = "postgres") -> str:
        """A plain (asyncpg / libpq) DSN over TCP."""
        return f"postgresql://{SERVER_USER}@127.0.0.1:{self.port}/{database}"

    def url(self, database: str, port: int | None = None) -> str:
        """The worker's ``DATABASE_URL`` for ``database`` (``port``: e.g. a proxy's)."""
        return f"postgresql+asyncpg://{SERVER_USER}@127.0.0.1:{port or self.port}/{database}"

    async def connect(self, database: str = "postgres") -> asyncpg.Connection:
        return await asyncpg.connect(self.dsn(database), timeout=10)

    # -- databases -----------------------------------------------------------------

    async def create_database(self, name: str, template: str | None = None) -> None:
        conn = await self.connect()
        try:
            clause = f" TEMPLATE {quote_ident(template)}" if template else ""
            await conn.execute(f"CREATE DATABASE {quote_ident(name)}{clause}")
        finally:
            await conn.close()

    async def drop_database(self, name: str) -> None:
        conn = await self.connect()
        try:
            await conn.execute(f"ALTER DATABASE {quote_ident(name)} IS_TEMPLATE false")
            await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
        except asyncpg.InvalidCatalogNameError:
            pass  # never created, or dropped already
        finally:
            await conn.close()

    async def migrate_template(self, name: str) -> None:
        """Create ``name``, migrate it (Alembic head, partitions ahead), make it a template
        that accepts no connections (a stray one would make every copy fail)."""
        await upgrade(Settings(database_url=self.url(name)), REGISTRY)
        conn = await self.connect()
        try:
            await conn.execute(
                f"ALTER DATABASE {quote_ident(name)} IS_TEMPLATE true ALLOW_CONNECTIONS false"
            )
        finally:
            await conn.close()

    # -- faults --------------------------------------------------------------------

    async def terminate_backends(
        self,
        database: str,
        *,
        application_name: str | None = None,
        mid_transaction_only: bool = False,
    ) -> list[int]:
        """``pg_terminate_backend`` the client sessions on ``database`` (never our own);
        with ``mid_transaction_only``, only those holding an uncommitted write
        (``backend_xid`` set: a batch between its first write and its COMMIT).
        Returns the pids terminated."""
        conn = await self.connect()
        try:
            rows = await conn.fetch(
                # In the select list, not the WHERE: only rows that passed every filter
                # are terminated (SQL promises no evaluation order within a WHERE).
                """
                SELECT pid, pg_terminate_backend(pid) AS terminated FROM pg_stat_activity
                WHERE datname = $1
                  AND pid <> pg_backend_pid()
                  AND backend_type = 'client backend'
                  AND ($2::text IS NULL OR application_name = $2)
                  AND (NOT $3 OR backend_xid IS NOT NULL)
                """,
                database,
                application_name,
                mid_transaction_only,
            )
        finally:
            await conn.close()
        return [row["pid"] for row in rows if row["terminated"]]

    async def terminate_mid_batch(
        self,
        database: str,
        *,
        application_name: str | None = None,
        timeout_s: float = 30,
    ) -> list[int]:
        """Wait until a session on ``database`` holds an uncommitted write, terminate it.

        One statement both finds and terminates, polled on one connection: a batch's
        transaction lasts milliseconds, and a second round trip would mostly miss it.
        Returns the pids terminated; empty if none was caught within ``timeout_s``.
        """
        conn = await self.connect()
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                rows = await conn.fetch(
                    """
                    SELECT pid, pg_terminate_backend(pid) AS terminated FROM pg_stat_activity
                    WHERE datname = $1
                      AND pid <> pg_backend_pid()
                      AND backend_type = 'client backend'
                      AND backend_xid IS NOT NULL
                      AND ($2::text IS NULL OR application_name = $2)
                    """,
                    database,
                    application_name,
                )
                terminated = [row["pid"] for row in rows if row["terminated"]]
                if terminated:
                    return terminated
                await asyncio.sleep(0.001)
            return []
        finally:
            await conn.close()


async def sweep_orphans(parent: Path | None = None) -> list[Path]:
    """Stop and delete clusters left by pytest processes that no longer exist."""
    removed: list[Path] = []
    root = parent or Path(tempfile.gettempdir())
    pattern = re.compile(rf"^{re.escape(FOLDER_PREFIX)}(\d+)-")
    for folder in root.glob(f"{FOLDER_PREFIX}*"):
        match = pattern.match(folder.name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        if (folder / "data" / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError):
                await _run(
                    [
                        str(bin_dir() / "pg_ctl"),
                        "stop",
                        "-D",
                        str(folder / "data"),
                        "-m",
                        "immediate",
                    ],
                    user=_run_as(),
                )
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed
