"""``serve`` and ``run`` on several processes (``worker.supervisor``): a process that
dies is started again while the others keep the port answering (and, for ``run``,
pulling: nothing is lost), SIGTERM drains every one of them, and a supervisor killed
outright takes its processes with it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
import uuid

import httpx
import pytest

from tests.faults.postgres import PostgresCluster, free_port
from tests.faults.processes import (
    Processes,
    WorkerProcess,
    gone,
    listeners,
    unshared_port,
    wait_gone,
    worker_environment,
)
from tests.support.factories import metric_payload
from tests.support.push import envelope
from worker.config import Settings
from worker.pubsub.client import PubSub, PubsubMessage

SIGKILLED = -signal.SIGKILL
PROCESSES = 2
MESSAGES = 4000


async def serve_processes(
    processes: Processes, settings: Settings, port: int, **extra: str
) -> WorkerProcess:
    env = worker_environment(settings, WORKER_PROCESSES=str(PROCESSES), **extra)
    server = await processes.start_server(env, port)
    [serving] = server.logged("serving")
    assert serving["processes"] == PROCESSES and serving["port"] == port
    assert len(server.served_by()) == PROCESSES, server.log_tail()
    return server


def sample_push(event_id: str) -> dict[str, object]:
    return envelope(metric_payload(event_id=event_id), message_id=event_id)


async def stored(cluster: PostgresCluster, database: str, event_ids: list[str]) -> set[str]:
    conn = await cluster.connect(database)
    try:
        rows = await conn.fetch(
            "SELECT id::text FROM system_metrics WHERE id = ANY($1::uuid[])",
            event_ids,
        )
    finally:
        await conn.close()
    return {row[0] for row in rows}


async def test_a_process_that_dies_is_started_again_and_the_port_never_refuses(
    fault_settings: Settings, processes: Processes
) -> None:
    port = free_port()
    server = await serve_processes(processes, fault_settings, port)
    first = server.served_by()
    answered, refused = 0, 0
    restarted = asyncio.Event()

    async def probe_until_restarted() -> None:
        nonlocal answered, refused
        while not restarted.is_set():
            # A new connection each time: every one meets the shared socket's accept.
            async with httpx.AsyncClient(timeout=5) as client:
                try:
                    response = await client.get(f"http://127.0.0.1:{port}/healthz")
                    answered += response.status_code == 200
                except httpx.TransportError:
                    refused += 1
            await asyncio.sleep(0.01)

    prober = asyncio.create_task(probe_until_restarted())
    os.kill(first[0], signal.SIGKILL)
    await server.wait_for_log(lambda e: e.get("message") == "a process died: starting it again")
    await server.wait_for_log(
        lambda e: e.get("message") == "process serving" and e.get("pid") not in first.values()
    )
    restarted.set()
    await prober
    [died] = server.logged("a process died: starting it again")
    assert died["pid"] == first[0] and died["exit_code"] == SIGKILLED
    now = server.served_by()
    assert now[1] == first[1] and now[0] != first[0] and not gone(now[0])
    assert refused == 0 and answered > 0
    assert await server.terminate() == 0, server.log_tail()
    await wait_gone(list(now.values()))


async def test_sigterm_drains_every_process_and_exits_0(
    fault_postgres: PostgresCluster,
    fault_database: str,
    fault_settings: Settings,
    processes: Processes,
) -> None:
    port = free_port()
    # Batches wait up to 500 ms: SIGTERM comes while every process holds pushes open.
    server = await serve_processes(processes, fault_settings, port, WORKER_MAX_BATCH_DELAY_MS="500")
    pids = list(server.served_by().values())
    event_ids = [str(uuid.uuid4()) for _ in range(400)]
    url = f"http://127.0.0.1:{port}/push/metrics"
    statuses: dict[str, int] = {}
    answered_at: list[float] = []

    async def post(client: httpx.AsyncClient, event_id: str) -> None:
        try:
            statuses[event_id] = (await client.post(url, json=sample_push(event_id))).status_code
            answered_at.append(time.monotonic())
        except httpx.TransportError:
            statuses[event_id] = 0  # cut before it was read: Pub/Sub would retry it

    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        posting = asyncio.gather(*(post(client, e) for e in event_ids))
        # The signal right after the first batch is answered: the pushes that came
        # since wait for the next one (a fixed sleep raced a cold machine's clients).
        deadline = time.monotonic() + 30
        while not answered_at:
            assert time.monotonic() < deadline, "no push answered within 30 s"
            await asyncio.sleep(0.01)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = await server.wait_exit(15)
        took_s = time.monotonic() - started
        await posting
    assert code == 0, server.log_tail()
    assert took_s < 10, f"drained in {took_s:.1f} s, over Cloud Run's 10 s"
    await wait_gone(pids)
    answered = [e for e, status in statuses.items() if status == 204]
    # Pushes waiting for their batch when the signal came were answered, not cut.
    assert any(at > started for at in answered_at), statuses
    # Every 204 is a committed row; nothing else was answered.
    assert set(answered) <= await stored(fault_postgres, fault_database, answered)
    assert {s for s in statuses.values()} <= {204, 0, 503}, statuses
    assert all(e.get("message") != "a process died: starting it again" for e in server.entries())


async def test_a_killed_supervisor_takes_its_processes_and_the_port_with_it(
    fault_settings: Settings, processes: Processes
) -> None:
    # Below the ephemeral range: no other test's server and no outgoing connection
    # takes the port once it is free, so whatever listens there would be ours.
    port = unshared_port()
    server = await serve_processes(processes, fault_settings, port)
    pids = list(server.served_by().values())
    assert listeners(port), "serving, yet nobody listens?"
    assert await server.kill() == SIGKILLED
    await wait_gone(pids, timeout_s=5)
    assert listeners(port) == {}  # no process holds the listening socket any more
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


async def test_a_process_that_cannot_start_stops_them_all(
    fault_settings: Settings, processes: Processes
) -> None:
    env = worker_environment(fault_settings, WORKER_PROCESSES=str(PROCESSES), PUSH_AUTH="required")
    child = await processes.spawn("serve", ["serve", "--host", "127.0.0.1"], {**env, "PORT": "0"})
    assert await child.wait_exit(60) == 2
    assert "PUSH_AUDIENCE" in child.log_tail()
    [failed] = child.logged("a process failed to start: stopping them all")
    assert failed["exit_code"] == 2


async def test_run_on_several_processes_loses_nothing_when_one_dies(
    fault_postgres: PostgresCluster,
    fault_database: str,
    fault_settings: Settings,
    fault_pubsub: PubSub,
    processes: Processes,
) -> None:
    event_ids = [str(uuid.uuid4()) for _ in range(MESSAGES)]
    env = worker_environment(
        fault_settings, WORKER_PROCESSES=str(PROCESSES), WORKER_MAX_BATCH_DELAY_MS="200"
    )
    worker = await processes.spawn("run", ["run", "--only", "metrics"], {**env, "PORT": "0"})
    await worker.wait_for_log("serving")
    first = worker.served_by()
    assert len(first) == PROCESSES, worker.log_tail()
    topic = fault_pubsub.topic("metrics")
    for start in range(0, MESSAGES, 500):
        chunk = event_ids[start : start + 500]
        messages = [
            PubsubMessage(data=json.dumps(metric_payload(event_id=e)).encode()) for e in chunk
        ]
        await fault_pubsub.publish(topic, messages, timeout_s=30)
        if start == MESSAGES // 2:
            # Half published, some of it held by the process about to die: what it
            # held comes back after the ack deadline, to either process.
            os.kill(first[0], signal.SIGKILL)
    await worker.wait_for_log(
        lambda e: e.get("message") == "process serving" and e.get("pid") not in first.values()
    )
    deadline = time.monotonic() + 60
    while len(found := await stored(fault_postgres, fault_database, event_ids)) < MESSAGES:
        assert time.monotonic() < deadline, f"{len(found)} of {MESSAGES} stored"
        await asyncio.sleep(0.5)
    [died] = worker.logged("a process died: starting it again")
    assert died["pid"] == first[0] and died["exit_code"] == SIGKILLED
    now = worker.served_by()
    assert await worker.terminate() == 0, worker.log_tail()
    await wait_gone(list(now.values()))
    assert len(worker.logged("worker stopped")) == PROCESSES
