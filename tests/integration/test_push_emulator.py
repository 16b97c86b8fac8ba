"""Push mode end to end: emulator push subscriptions deliver to ``utxoiq-worker serve``.

The server is the real console script in a subprocess on a loopback port
(``PUSH_AUTH=disabled``: the emulator sends no token, BASELINES.md); the topology is
applied with ``push_endpoint`` so the worker subscriptions push to ``/push/{topic}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.emulator import (
    drain_dead_letters,
    json_log_entries,
    publish,
    scalar,
    wait_for_count,
)
from tests.support.factories import backfill_payload, feedback_payload, metric_payload
from tests.support.topics import REGISTRY
from worker.config import Settings
from worker.pubsub import topology
from worker.pubsub.client import PubSub

ROOT = Path(__file__).resolve().parents[2]
CONSOLE_SCRIPT = Path(sys.executable).parent / "utxoiq-worker"
SHUTDOWN_BUDGET_S = 10


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def serve_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("WORKER_", "OTEL_", "PUSH_")) and k != "PORT"
    }
    env.update(
        DATABASE_URL=settings.database_url,
        GOOGLE_CLOUD_PROJECT=settings.google_cloud_project,
        PUBSUB_EMULATOR_HOST=settings.pubsub_emulator_host or "",
        LOG_LEVEL="INFO",
    )
    env.update(extra)
    return env


class ServerProcess:
    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}"
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    async def wait_healthy(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=2) as client:
            while time.monotonic() < deadline:
                assert self.process.returncode is None, f"serve exited:\n{self.log()}"
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"{self.url}/healthz")).status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise AssertionError(f"serve did not answer /healthz within {timeout_s}s:\n{self.log()}")

    async def wait(self, timeout_s: float) -> int:
        code = await asyncio.wait_for(self.process.wait(), timeout_s)
        await asyncio.wait_for(self._reader, 5)
        return code

    def log(self) -> str:
        return "\n".join(self.lines[-40:])


@asynccontextmanager
async def serve(env: Mapping[str, str], port: int) -> AsyncIterator[ServerProcess]:
    """``utxoiq-worker serve --host 127.0.0.1`` on ``port``; killed on exit if still alive."""
    assert CONSOLE_SCRIPT.exists(), f"{CONSOLE_SCRIPT} missing: run `uv sync`"
    process = await asyncio.create_subprocess_exec(
        str(CONSOLE_SCRIPT),
        "serve",
        "--host",
        "127.0.0.1",
        env={**env, "PORT": str(port)},
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        limit=4 * 1024 * 1024,
    )
    server = ServerProcess(process, port)
    try:
        yield server
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server._reader, 5)


async def test_emulator_push_subscriptions_deliver_to_serve(
    settings: Settings, pubsub_emulator: str, engine: AsyncEngine
) -> None:
    project = dataclasses.replace(
        settings,
        google_cloud_project=f"push-{uuid.uuid4().hex[:12]}",
        pubsub_emulator_host=pubsub_emulator,
    )
    port = free_port()
    async with serve(serve_env(project, PUSH_AUTH="disabled"), port) as server:
        await server.wait_healthy()
        counts = await topology.apply(project, REGISTRY, push_endpoint=server.url)
        assert counts["subscriptions_created"] == 10, counts
        pubsub = PubSub(project)
        try:
            samples = [metric_payload(event_id=str(uuid.uuid4())) for _ in range(60)]
            batch = {"metrics": [metric_payload(event_id=str(uuid.uuid4())) for _ in range(40)]}
            await publish(pubsub, "metrics", [*samples, batch, samples[0]])  # one duplicate
            await publish(pubsub, "feedback", [feedback_payload()])
            await publish(pubsub, "backfill-progress", [backfill_payload()])
            bad = [
                b"{not json",
                b"\xff\xfe not utf-8",
                json.dumps(metric_payload(metric_value="high")).encode(),
            ]
            await publish(pubsub, "metrics", bad, attributes={"origin": "push-test"})

            await wait_for_count(engine, "SELECT count(*) FROM system_metrics", 100)
            await wait_for_count(engine, "SELECT count(*) FROM insight_feedback", 1)
            await wait_for_count(engine, "SELECT count(*) FROM backfill_jobs", 1)
            letters = await drain_dead_letters(pubsub, "metrics", expected=3)
            reasons = sorted(m.attributes["dead_letter_reason"] for m in letters)
            assert reasons == ["invalid_encoding", "invalid_json", "schema_violation"], letters
            assert sorted(m.data for m in letters) == sorted(bad)
            for letter in letters:
                assert letter.attributes["origin"] == "push-test"
                assert letter.attributes["source_topic"] == "metrics"
                assert letter.attributes["source_subscription"] == "metrics-worker"
            # Each sample once, the duplicate included; no other topic dead-lettered.
            assert await scalar(engine, "SELECT count(*) FROM system_metrics") == 100
            assert await drain_dead_letters(pubsub, "feedback", quiet_s=0.5) == []
        finally:
            await pubsub.close()
            # Back to pull subscriptions: the emulator stops pushing to a port soon closed.
            await topology.apply(project, REGISTRY)

        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = await server.wait(SHUTDOWN_BUDGET_S)
        assert code == 0, server.log()
        assert time.monotonic() - started < SHUTDOWN_BUDGET_S
    entries = json_log_entries(server.lines)
    assert any("PUSH_AUTH=disabled" in e["message"] for e in entries), server.log()
    assert not [e for e in entries if e["severity"] in ("ERROR", "CRITICAL")], server.log()


async def test_serve_with_push_auth_required_and_no_audience_refuses_to_start(
    settings: Settings,
) -> None:
    env = serve_env(settings, PUSH_AUTH="required", PUSH_SERVICE_ACCOUNTS="sa@x.test")
    async with serve(env, free_port()) as server:
        code = await server.wait(30)
    assert code != 0
    assert "PUSH_AUDIENCE" in server.log(), server.log()


async def test_serve_with_push_auth_required_and_no_service_accounts_refuses_to_start(
    settings: Settings,
) -> None:
    env = serve_env(settings, PUSH_AUTH="required", PUSH_AUDIENCE="https://worker.test/push")
    async with serve(env, free_port()) as server:
        code = await server.wait(30)
    assert code != 0
    assert "PUSH_SERVICE_ACCOUNTS" in server.log(), server.log()
