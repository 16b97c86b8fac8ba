"""pg_dump and pg_restore as streaming subprocesses (the database boundary of backups).

A dump is read from pg_dump's stdout chunk by chunk and a restore is fed to
pg_restore's stdin chunk by chunk: nothing is ever held whole in memory or on local
disk. A tool that exits non-zero (or is killed) raises ``MaintenanceError`` with the
tail of what it wrote on stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import URL, make_url

from worker.exceptions import MaintenanceError

CHUNK_BYTES = 1024 * 1024
_STDERR_TAIL_BYTES = 8192
_VERSION = re.compile(rb"\(PostgreSQL\) (\d+)(?:\.(\d+))?")


@dataclass(frozen=True)
class Connection:
    """A libpq connection target: the URL passed to the tools, and the password
    passed in their environment (never on a command line that ``ps`` shows)."""

    url: str
    password: str | None
    database: str

    @classmethod
    def from_database_url(cls, database_url: str) -> Connection:
        url = make_url(database_url)
        if not url.database:
            raise ValueError(f"the database URL names no database: {url!r}")
        # URL.set ignores None: a new URL is the only way to leave the password out.
        query = _libpq_query(url.query)
        libpq = URL.create(
            "postgresql", url.username, None, url.host, url.port, url.database, query
        )
        return cls(libpq.render_as_string(hide_password=False), url.password, url.database)

    def with_database(self, database: str) -> Connection:
        url = make_url(self.url).set(database=database)
        return Connection(url.render_as_string(hide_password=False), self.password, database)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.password is not None:
            env["PGPASSWORD"] = self.password
        return env


# Query parameters libpq understands, kept (``host=/cloudsql/...`` is how Cloud Run
# reaches Cloud SQL); asyncpg's ``ssl`` is libpq's ``sslmode``; the rest is asyncpg's.
_LIBPQ_PARAMETERS = {"host", "port", "sslmode", "sslrootcert", "sslcert", "sslkey", "options"}


def _libpq_query(query: Mapping[str, str | tuple[str, ...]]) -> dict[str, str]:
    kept: dict[str, str] = {}
    for name, value in query.items():
        text = value if isinstance(value, str) else value[-1]
        if name == "ssl":
            kept["sslmode"] = text
        elif name in _LIBPQ_PARAMETERS:
            kept[name] = text
    return kept


def tool(name: str, bin_dir: str | None) -> str:
    """The path of PostgreSQL client ``name`` (``PG_BIN_DIR``, else ``PATH``)."""
    if bin_dir:
        path = Path(bin_dir) / name
        if not os.access(path, os.X_OK):
            raise MaintenanceError(f"{name} not found in PG_BIN_DIR ({bin_dir})")
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise MaintenanceError(
            f"{name} is not installed (PATH); install the PostgreSQL client or set PG_BIN_DIR"
        )
    return found


def parse_major(version_output: bytes) -> int:
    """The major version in ``pg_dump --version``'s output (``pg_dump (PostgreSQL) 15.4``)."""
    match = _VERSION.search(version_output)
    if match is None:
        raise MaintenanceError(f"cannot read a PostgreSQL version in {version_output[:200]!r}")
    return int(match.group(1))


async def client_major(path: str) -> int:
    process = await asyncio.create_subprocess_exec(
        path, "--version", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    return parse_major(output)


def require_dump_compatible(client: int, server_version_num: int, path: str) -> None:
    """pg_dump refuses (or worse, misreads) a server newer than itself: fail first, clearly."""
    server = server_version_num // 10000
    if client < server:
        raise MaintenanceError(
            f"{path} is PostgreSQL {client} but the server is {server}: pg_dump's major "
            f"version must be at least the server's; install postgresql-client-{server} "
            "or newer and point PG_BIN_DIR at it"
        )


class _Tail:
    """The last bytes a process wrote on stderr, read while it runs."""

    def __init__(self, stream: asyncio.StreamReader | None) -> None:
        self.data = b""
        self._task = asyncio.create_task(self._read(stream)) if stream is not None else None

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(65536):
            self.data = (self.data + chunk)[-_STDERR_TAIL_BYTES:]

    async def text(self) -> str:
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
        return self.data.decode("utf-8", "replace").strip()


async def _failure(name: str, returncode: int, tail: _Tail) -> MaintenanceError:
    said = await tail.text()
    how = f"was killed by signal {-returncode}" if returncode < 0 else f"exited with {returncode}"
    return MaintenanceError(f"{name} {how}: {said[-2000:] or '(nothing on stderr)'}")


async def _stop(process: asyncio.subprocess.Process) -> None:
    """Kill ``process`` if it still runs (the caller gave up on it) and reap it."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    await process.wait()


async def dump(
    pg_dump: str, target: Connection, snapshot: str | None = None
) -> AsyncIterator[bytes]:
    """``pg_dump -Fc`` of ``target``, chunk by chunk; raises at the end if it failed.

    The last chunk is yielded only after pg_dump exited 0, so a consumer that commits
    on a clean end never commits a dump that pg_dump did not finish.
    """
    args = [pg_dump, "--format=custom", "--no-password", f"--dbname={target.url}"]
    if snapshot is not None:
        args.append(f"--snapshot={snapshot}")
    process = await asyncio.create_subprocess_exec(
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=target.environment(),
        limit=CHUNK_BYTES,
    )
    tail = _Tail(process.stderr)
    assert process.stdout is not None
    try:
        # Pipe reads come 64 KiB at a time: gathered into CHUNK_BYTES, each write
        # downstream (a thread hop, an upload request) carries a useful amount.
        held = bytearray()
        while chunk := await process.stdout.read(CHUNK_BYTES):
            held += chunk
            if len(held) >= 2 * CHUNK_BYTES:
                yield bytes(held[:CHUNK_BYTES])
                del held[:CHUNK_BYTES]
        returncode = await process.wait()
        if returncode != 0:
            raise await _failure("pg_dump", returncode, tail)
        while held:
            yield bytes(held[:CHUNK_BYTES])
            del held[:CHUNK_BYTES]
    finally:
        await _stop(process)


async def restore_stream(
    pg_restore: str, target: Connection, chunks: AsyncIterator[bytes], options: Sequence[str] = ()
) -> None:
    """Feed ``chunks`` (a custom-format dump) to ``pg_restore`` into ``target``."""
    process = await asyncio.create_subprocess_exec(
        pg_restore,
        "--no-password",
        "--no-owner",
        "--exit-on-error",
        *options,
        f"--dbname={target.url}",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=target.environment(),
    )
    tail = _Tail(process.stderr)
    assert process.stdin is not None
    try:
        try:
            async with contextlib.aclosing(chunks):  # type: ignore[type-var]
                async for chunk in chunks:
                    process.stdin.write(chunk)
                    await process.stdin.drain()
            process.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass  # pg_restore stopped reading: its exit status and stderr say why
        returncode = await process.wait()
        if returncode != 0:
            raise await _failure("pg_restore", returncode, tail)
    finally:
        await _stop(process)


async def restore_file(
    pg_restore: str, target: Connection, path: Path, jobs: int, options: Sequence[str] = ()
) -> None:
    """``pg_restore --jobs`` of a dump file (parallel restore needs a seekable file)."""
    process = await asyncio.create_subprocess_exec(
        pg_restore,
        "--no-password",
        "--no-owner",
        "--exit-on-error",
        f"--jobs={jobs}",
        *options,
        f"--dbname={target.url}",
        str(path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=target.environment(),
    )
    tail = _Tail(process.stderr)
    try:
        returncode = await process.wait()
        if returncode != 0:
            raise await _failure("pg_restore", returncode, tail)
    finally:
        await _stop(process)
