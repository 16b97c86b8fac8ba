"""The real CLI as a subprocess (``python -m worker ...``), end to end on the emulator."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.emulator import (
    drain_dead_letters,
    json_log_entries,
    publish,
    scalar,
    wait_for,
    wait_for_count,
)
from tests.support.factories import T0, at, backfill_payload, feedback_payload, metric_payload
from tests.support.topics import INGEST_TOPICS, REGISTRY
from worker.config import Settings
from worker.pubsub import topology
from worker.pubsub.client import PubSub

ROOT = Path(__file__).resolve().parents[2]


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "OTEL_"))}
    env.pop("PUSH_ENDPOINT", None)
    env.update(
        DATABASE_URL=settings.database_url,
        GOOGLE_CLOUD_PROJECT=settings.google_cloud_project,
        PUBSUB_EMULATOR_HOST=settings.pubsub_emulator_host or "",
        LOG_LEVEL="INFO",
        PORT="0",  # `run` serves its probes on PORT: any free one, as several run at once
        # One process: these tests follow one process's log (several: test_processes).
        WORKER_PROCESSES="1",
    )
    env.update(extra)
    return env


async def run_cli(env: Mapping[str, str], *args: str, timeout_s: float = 60) -> tuple[int, str]:
    """Run ``python -m worker ARGS`` to the end; its exit code and stdout."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        *args,
        env=dict(env),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    assert process.returncode is not None
    if process.returncode != 0:
        sys.stderr.write(err.decode("utf-8", "replace"))
    return process.returncode, out.decode()


class WorkerProcess:
    """``python -m worker run`` in the background, its stderr collected line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self.started = asyncio.Event()
        self.probe_port: int | None = None
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            if '"worker started"' in line:
                self.started.set()
            if '"probes listening"' in line:
                self.probe_port = int(json.loads(line)["port"])

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    async def wait(self, timeout_s: float) -> int:
        code = await asyncio.wait_for(self.process.wait(), timeout_s)
        await self._reader
        return code

    def log(self) -> str:
        return "\n".join(self.lines[-40:])


@asynccontextmanager
async def worker_process(settings: Settings, *args: str) -> AsyncIterator[WorkerProcess]:
    """Start ``run``, wait until it says it started; killed on exit if still alive."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "run",
        *args,
        env=cli_env(settings),
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        limit=4 * 1024 * 1024,
    )
    worker = WorkerProcess(process)
    try:
        started = asyncio.create_task(worker.started.wait())
        exited = asyncio.create_task(process.wait())
        await asyncio.wait({started, exited}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        exited.cancel()
        assert worker.started.is_set(), f"the worker did not start:\n{worker.log()}"
        yield worker
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(worker._reader, 5)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


# -- topology ---------------------------------------------------------------------------


async def test_topology_apply_twice_is_idempotent(settings: Settings, pubsub_emulator: str) -> None:
    project = f"cli-{uuid.uuid4().hex[:12]}"
    env = cli_env(settings, GOOGLE_CLOUD_PROJECT=project, PUBSUB_EMULATOR_HOST=pubsub_emulator)
    code, first = await run_cli(env, "topology", "apply")
    assert code == 0
    assert first.split() == [
        "topics_created=10",
        "subscriptions_created=10",
        "subscriptions_updated=0",
    ]
    code, second = await run_cli(env, "topology", "apply")
    assert code == 0
    assert second.split() == [
        "topics_created=0",
        "subscriptions_created=0",
        "subscriptions_updated=10",
    ]
    # What exists works as the contract says: a worker subscription reads its topic.
    client = PubSub(Settings(google_cloud_project=project, pubsub_emulator_host=pubsub_emulator))
    try:
        await publish(client, "feedback", [b"{}"])
        message = await client.pull(client.subscription("feedback-worker"), 10, 5)
        assert [m.message.data for m in message] == [b"{}"]
    finally:
        await client.close()


def test_topology_render_is_the_committed_deploy_file() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PUSH_ENDPOINT"}
    result = subprocess.run(
        [sys.executable, "-m", "worker", "topology", "render"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        check=True,
    )
    committed = (ROOT / "deploy" / "pubsub-topology.json").read_text()
    assert result.stdout.decode() == committed
    assert json.loads(committed) == topology.render(REGISTRY)


# -- run ----------------------------------------------------------------------------------


async def test_sigterm_drains_and_a_second_run_finishes_exactly_once(
    pubsub_settings: Settings, pubsub: PubSub, engine: AsyncEngine
) -> None:
    count = 5000
    samples = [
        metric_payload(
            event_id=str(uuid.uuid4()),
            metric_value=float(i),
            timestamp=iso(T0 + timedelta(milliseconds=i)),
        )
        for i in range(count)
    ]
    stored = "SELECT count(*) FROM system_metrics"

    async def publish_steadily() -> None:
        # 100 messages every 20 ms: the worker is still receiving when SIGTERM comes.
        for i in range(0, count, 100):
            await publish(pubsub, "metrics", samples[i : i + 100])
            await asyncio.sleep(0.02)

    async with worker_process(pubsub_settings) as first:
        publisher = asyncio.create_task(publish_steadily())
        try:
            # Cloud Run's probes: alive, and ready once pulling with every dependency up.
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{first.probe_port}") as probe:
                assert (await probe.get("/healthz")).json() == {"status": "ok"}
                ready = await probe.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["checks"] == {
                "pulling": True,
                "database": True,
                "redis": True,
                "pubsub": True,
            }
            await wait_for_count(engine, stored, 300, timeout_s=30)
            at_signal = int(await scalar(engine, stored))
            signalled = time.monotonic()
            first.terminate()
            code = await first.wait(timeout_s=10)
            stopped_in_s = time.monotonic() - signalled
        finally:
            await publisher
    assert code == 0, first.log()
    assert stopped_in_s < 10
    assert at_signal < count, "the worker was done before SIGTERM: nothing was drained"

    entries = json_log_entries(first.lines)
    assert entries, first.log()
    assert all({"severity", "message"} <= set(e) for e in entries), first.log()
    messages = {(e["severity"], e["message"]) for e in entries}
    assert ("INFO", "worker started") in messages
    assert ("INFO", "worker stopped") in messages
    after_first = int(await scalar(engine, stored))
    assert after_first >= at_signal

    # What the first one nacked at stop comes back after the retry policy's backoff.
    async with worker_process(pubsub_settings) as second:
        await wait_for_count(engine, stored, count, timeout_s=90)
        second.terminate()
        assert await second.wait(timeout_s=10) == 0, second.log()

    assert int(await scalar(engine, stored)) == count
    assert int(await scalar(engine, "SELECT count(DISTINCT id) FROM system_metrics")) == count
    assert int(await scalar(engine, "SELECT count(*) FROM system_metric_ids")) == count
    async with engine.connect() as conn:
        ids = {r[0] for r in await conn.execute(text("SELECT id FROM system_metrics"))}
    assert ids == {uuid.UUID(s["event_id"]) for s in samples}
    assert await drain_dead_letters(pubsub, "metrics") == []


# -- two processes ------------------------------------------------------------------------


def backfill_events(rng: random.Random, jobs: int) -> tuple[list[dict[str, Any]], dict[Any, Any]]:
    """Events of ``jobs`` jobs and, by CONTRACT.md's rules, the row each must end as."""
    events: list[dict[str, Any]] = []
    expected: dict[Any, Any] = {}
    for j in range(jobs):
        job_id = uuid.uuid4()
        start, end = 1000 * j, 1000 * j + 400
        own: list[dict[str, Any]] = []
        for minute in rng.sample(range(100), 8):
            status = rng.choice(["running", "running", "paused", "failed", "completed"])
            current = end if status == "completed" else rng.randint(start, end)
            own.append(
                backfill_payload(
                    job_id=str(job_id),
                    job_type=f"type-{j % 3}",
                    start_block=start,
                    end_block=end,
                    current_block=current,
                    status=status,
                    error_message=f"e{minute}" if status == "failed" else None,
                    created_by=f"user-{minute}",
                    occurred_at=iso(at(minute)),
                )
            )
        ordered = sorted(own, key=lambda e: e["occurred_at"])
        completing = next((e for e in ordered if e["status"] == "completed"), None)
        decisive = completing or ordered[-1]
        current = end if completing else max(e["current_block"] for e in own)
        expected[job_id] = (
            current,
            decisive["status"],
            decisive["error_message"],
            Decimal(current - start) / Decimal(end - start) * 100,
            datetime.fromisoformat(ordered[0]["occurred_at"]),
            datetime.fromisoformat(completing["occurred_at"]) if completing else None,
            ordered[0]["created_by"],
        )
        events += own
    return events, expected


def feedback_events(rng: random.Random, pairs: int) -> tuple[list[dict[str, Any]], dict[Any, Any]]:
    events: list[dict[str, Any]] = []
    expected: dict[Any, Any] = {}
    for p in range(pairs):
        insight, user = f"insight-{p % 40}", f"user-{p}"
        minutes = rng.sample(range(1000), 5)
        own = [
            feedback_payload(
                insight_id=insight,
                user_id=user,
                rating=rng.randint(1, 5),
                comment=f"c{m}",
                occurred_at=iso(at(m)),
            )
            for m in minutes
        ]
        latest = max(own, key=lambda e: e["occurred_at"])
        expected[(insight, user)] = (
            latest["rating"],
            latest["comment"],
            at(min(minutes)),
            at(max(minutes)),
        )
        events += own
    return events, expected


async def current_state(engine: AsyncEngine) -> dict[str, Any]:
    async with engine.connect() as conn:
        jobs = {
            r[0]: tuple(r[1:])
            for r in await conn.execute(
                text(
                    "SELECT id, current_block, status, error_message, progress_percentage,"
                    " started_at, completed_at, created_by FROM backfill_jobs"
                )
            )
        }
        feedback = {
            (r[0], r[1]): tuple(r[2:])
            for r in await conn.execute(
                text(
                    "SELECT insight_id, user_id, rating, comment, created_at, updated_at"
                    " FROM insight_feedback"
                )
            )
        }
        metric_ids = {r[0] for r in await conn.execute(text("SELECT id FROM system_metrics"))}
        metric_rows = (await conn.execute(text("SELECT count(*) FROM system_metrics"))).scalar()
    return {"jobs": jobs, "feedback": feedback, "metric_ids": metric_ids, "rows": metric_rows}


async def test_run_refuses_to_start_when_its_probe_port_is_taken(settings: Settings) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = cli_env(settings, PORT=str(port), PUBSUB_EMULATOR_HOST="127.0.0.1:1")
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker", "run", env=env, cwd=ROOT,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1, err
    assert f"cannot listen on 0.0.0.0:{port}: Address already in use".encode() in err


async def test_two_processes_on_the_same_subscriptions_give_one_process_s_result(
    pubsub_settings: Settings, pubsub: PubSub, engine: AsyncEngine
) -> None:
    rng = random.Random(7)
    jobs, expected_jobs = backfill_events(rng, 40)
    opinions, expected_feedback = feedback_events(rng, 150)
    samples = [
        metric_payload(event_id=str(uuid.uuid4()), metric_value=i + 0.5) for i in range(1000)
    ]
    batches = [{"metrics": samples[i : i + 50]} for i in range(0, 300, 50)]
    messages: dict[str, list[Any]] = {
        "backfill-progress": jobs * 2 + rng.sample(jobs, 80),
        "feedback": opinions + rng.sample(opinions, 250),
        "metrics": samples + batches + rng.sample(samples, 300),
    }
    for topic_messages in messages.values():
        rng.shuffle(topic_messages)
    assert sum(len(m) for m in messages.values()) == 3026
    expected = {
        "jobs": {
            job_id: (
                current,
                status,
                error,
                progress.quantize(Decimal("0.01")),
                started,
                completed,
                created_by,
            )
            for job_id, (
                current,
                status,
                error,
                progress,
                started,
                completed,
                created_by,
            ) in expected_jobs.items()
        },
        "feedback": expected_feedback,
        "metric_ids": {uuid.UUID(s["event_id"]) for s in samples},
        "rows": len(samples),
    }

    small = ("--max-outstanding-messages", "300")
    async with (
        worker_process(pubsub_settings, *small) as one,
        worker_process(pubsub_settings, *small) as two,
    ):
        await asyncio.gather(*(publish(pubsub, topic, m) for topic, m in messages.items()))
        await wait_for(
            lambda: current_state(engine),
            lambda state: state == expected,
            timeout_s=60,
            interval_s=0.25,
            what="the expected final state",
        )
        # Stays so while the last duplicates come through.
        await asyncio.sleep(2)
        one.terminate()
        two.terminate()
        assert await one.wait(timeout_s=10) == 0, one.log()
        assert await two.wait(timeout_s=10) == 0, two.log()

    state = await current_state(engine)
    assert state["jobs"] == expected["jobs"]
    assert state["feedback"] == expected["feedback"]
    assert state["metric_ids"] == expected["metric_ids"]
    assert state["rows"] == expected["rows"]
    letters = await asyncio.gather(*(drain_dead_letters(pubsub, t) for t in INGEST_TOPICS))
    assert letters == [[], [], []]
