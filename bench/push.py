"""Scenario ``push``: Cloud Run push mode under load.

``python -m worker serve`` (``PUSH_AUTH=disabled``) on a loopback port, a fresh
database and a fresh emulator project; 64 concurrent HTTP clients post valid metrics
push envelopes, each sample with an ``event_id`` of its own, for 20 s. Figures:
requests/s (204s only) and p99 latency, with ``serve`` on one process per core (the
default) and on one process. In the same run, the same load against two baselines:
the ceiling (``bench.empty_push``: the same server and processes answering 204 with
no work) and the naive endpoint (``bench.naive_push``: one transaction per request).

Saturation p99 measures wrk's queue as much as the server, so each server on one
process per core is also offered a fixed rate for 15 s (``bench.paced``, wrk2's way:
latency from each request's due time): half of what ``serve`` sustained at
saturation, the same rate for the ceiling. ``paced_p99_ms`` is that p99, against the
ceiling's at the same rate.

The load comes from wrk, whose Lua script makes every body unique without encoding
base64 per request: the payload is laid out so that its variable part (the last 12
hex digits of ``event_id``) starts on a 3-byte boundary, and the base64 of every
3-hex-digit group is precomputed. Without wrk, two httpx client processes do it.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from bench import paced
from bench.common import asyncpg_dsn, fresh_database, percentile, report
from bench.stack import bench_settings, fresh_topology, stop_process
from worker.config import Settings
from worker.supervisor import cpu_quota

DURATION_S = 20
WARMUP_S = 2
PACED_S = 15
PACED_SHARE = 0.5  # of the saturation rate
CONNECTIONS = 64
CLIENT_THREADS = 2
# '{  "event_id":"' (15) + 'tttttttt-0000-4000-8000-' (24): the counter starts at 39.
PAYLOAD_HEAD = '{  "event_id":"%08x-0000-4000-8000-'


@dataclass(frozen=True)
class Load:
    ok: int
    failed: int
    duration_s: float
    p50_ms: float
    p99_ms: float

    @property
    def per_s(self) -> float:
        return self.ok / self.duration_s


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def b64(text: str) -> str:
    return base64.b64encode(text.encode("ascii")).decode("ascii")


def _pieces(project: str, tag: int) -> tuple[str, str, str]:
    """The envelope around the base64 of one sample: before, data head, after."""
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    head = PAYLOAD_HEAD % tag
    assert len(head) % 3 == 0
    tail = (
        '","service_name":"bench-push","metric_type":"cpu","metric_value":42.5,'
        f'"unit":"percent","timestamp":"{now}","metadata":{{"host":"h{tag}"}}}}'
    )
    before = '{"message":{"attributes":{},"publishTime":"' + now + '","data":"' + b64(head)
    after = (
        b64(tail) + '","messageId":"%s"},'
        f'"subscription":"projects/{project}/subscriptions/metrics-worker"}}'
    )
    return before, after, tail


def _lua_script(project: str, first: int) -> str:
    triples = ",".join(f'"{b64(f"{i:03x}")}"' for i in range(4096))
    befores, afters = [], []
    for thread in range(1, CLIENT_THREADS + 1):
        before, after, _ = _pieces(project, thread)
        befores.append(json.dumps(before))
        afters.append(json.dumps(after))
    return f"""
local triples = {{{triples}}}
local befores = {{{",".join(befores)}}}
local afters = {{{",".join(afters)}}}
local headers = {{["Content-Type"] = "application/json"}}
local counter = {first}
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function request()
  counter = counter + 1
  local n = counter
  local t4 = triples[n % 4096 + 1]; n = math.floor(n / 4096)
  local t3 = triples[n % 4096 + 1]; n = math.floor(n / 4096)
  local t2 = triples[n % 4096 + 1]; n = math.floor(n / 4096)
  local t1 = triples[n % 4096 + 1]
  local body = befores[tid] .. t1 .. t2 .. t3 .. t4
    .. string.format(afters[tid], tid .. "-" .. counter)
  return wrk.format("POST", nil, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def _wrk(url: str, script: Path, duration_s: int) -> Load:
    result = subprocess.run(
        [
            "wrk",
            f"-t{CLIENT_THREADS}",
            f"-c{CONNECTIONS}",
            f"-d{duration_s}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        timeout=duration_s + 60,
        check=True,
    )
    line = [x for x in result.stdout.splitlines() if x.startswith("{")][-1]
    figures = json.loads(line)
    failed = sum(figures[k] for k in ("connect", "read", "write", "status", "timeout"))
    return Load(
        ok=figures["requests"] - figures["status"],
        failed=failed,
        duration_s=figures["duration_us"] / 1e6,
        p50_ms=figures["p50_us"] / 1000,
        p99_ms=figures["p99_us"] / 1000,
    )


def _paced_requests(project: str, first: int, count: int) -> list[bytes]:
    """``count`` push requests of distinct event ids, from ``first`` on."""
    before, after, _ = _pieces(project, 0)
    return [
        paced.post("/push/metrics", (before + b64(f"{n:012x}") + after % f"p-{n}").encode())
        for n in range(first, first + count)
    ]


# -- fallback: httpx clients in two processes -----------------------------------------


def _httpx_client(url: str, project: str, tag: int, duration_s: int, tasks: int) -> str:
    import httpx

    before, after, _ = _pieces(project, tag)
    latencies: list[float] = []
    failed = 0
    counter = 0

    async def worker(client: httpx.AsyncClient, deadline: float) -> None:
        nonlocal failed, counter
        while time.monotonic() < deadline:
            counter += 1
            body = before + b64(f"{counter:012x}")[:16] + after % f"{tag}-{counter}"
            started = time.perf_counter()
            response = await client.post(
                url, content=body, headers={"content-type": "application/json"}
            )
            if response.status_code == 204:
                latencies.append(time.perf_counter() - started)
            else:
                failed += 1

    async def main() -> None:
        limits = httpx.Limits(max_connections=tasks)
        async with httpx.AsyncClient(limits=limits, timeout=10) as client:
            deadline = time.monotonic() + duration_s
            await asyncio.gather(*(worker(client, deadline) for _ in range(tasks)))

    asyncio.run(main())
    return json.dumps({"latencies": latencies, "failed": failed})


def _httpx(url: str, project: str, duration_s: int) -> Load:
    processes = 2
    context = multiprocessing.get_context("spawn")
    started = time.monotonic()
    with context.Pool(processes) as pool:
        parts = pool.starmap(
            _httpx_client,
            [(url, project, tag, duration_s, CONNECTIONS // processes) for tag in (1, 2)],
        )
    elapsed = time.monotonic() - started
    results = [json.loads(p) for p in parts]
    latencies = sorted(x for r in results for x in r["latencies"])
    return Load(
        ok=len(latencies),
        failed=sum(r["failed"] for r in results),
        duration_s=min(elapsed, duration_s),
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
    )


# -- servers --------------------------------------------------------------------------


def _start(
    module: str, settings: Settings, port: int, processes: int, *args: str
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "WORKER_PROCESSES": str(processes),
        "DATABASE_URL": settings.database_url,
        "GOOGLE_CLOUD_PROJECT": settings.google_cloud_project,
        "PORT": str(port),
        "PUSH_AUTH": "disabled",
        "LOG_LEVEL": "WARNING",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{module} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                return process
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"{module} did not answer /healthz within 60 s")


async def _rows(settings: Settings) -> int:
    conn = await asyncpg.connect(asyncpg_dsn(settings))
    try:
        return int(await conn.fetchval("SELECT count(*) FROM system_metrics"))
    finally:
        await conn.close()


async def _measure(
    module: str, settings: Settings, processes: int, *args: str, paced_per_s: float | None = None
) -> tuple[Load, paced.PacedLoad | None]:
    """Serve with ``module`` on ``processes``, warm it up, load it for ``DURATION_S``;
    then, with ``paced_per_s``, offer that fixed rate (0: half the rate just measured)
    for ``PACED_S``; check the rows (none for the ceiling, which stores nothing)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/push/metrics"
    process = await asyncio.to_thread(_start, module, settings, port, processes, *args)
    try:
        if shutil.which("wrk"):
            with tempfile.TemporaryDirectory() as scratch:
                warmup, measured = Path(scratch) / "warmup.lua", Path(scratch) / "push.lua"
                # Event ids of the measured run start far past the warm-up's, and each
                # measurement's past the last one's: a repeated id would be a no-op.
                first = next(_SERIES) * 10**13
                warmup.write_text(_lua_script(settings.google_cloud_project, first))
                measured.write_text(_lua_script(settings.google_cloud_project, first + 10**12))
                await asyncio.to_thread(_wrk, url, warmup, WARMUP_S)
                before = await _rows(settings)
                load = await asyncio.to_thread(_wrk, url, measured, DURATION_S)
        else:
            print("bench push: wrk not found, using httpx clients", file=sys.stderr)
            before = await _rows(settings)
            load = await asyncio.to_thread(_httpx, url, settings.google_cloud_project, DURATION_S)
        fixed = None
        if paced_per_s is not None:
            rate = paced_per_s or load.per_s * PACED_SHARE
            requests = _paced_requests(
                settings.google_cloud_project, next(_SERIES) * 10**13, int(rate * PACED_S)
            )
            fixed = await paced.offer("127.0.0.1", port, requests, rate, CONNECTIONS)
    finally:
        await asyncio.to_thread(stop_process, process)
    answered = load.ok + (fixed.ok if fixed else 0)
    failed = load.failed + (fixed.failed if fixed else 0)
    stored = answered if module == CEILING else await _rows(settings) - before
    if failed or stored < answered:
        print(
            f"bench push ({module}): {failed} failed requests, "
            f"{stored} rows for {answered} answered 204",
            file=sys.stderr,
        )
    return load, fixed


CEILING = "bench.empty_push"
_SERIES = itertools.count()


async def run() -> None:
    cores = cpu_quota()
    settings = bench_settings(await fresh_database("utxoiq_bench_push"))
    pubsub = await fresh_topology(settings)  # dead-letter and invalidation topics
    await pubsub.close()
    serve = ("serve", "--host", "127.0.0.1")
    push, push_paced = await _measure("worker", settings, cores, *serve, paced_per_s=0)
    assert push_paced is not None
    ceiling, ceiling_paced = await _measure(
        CEILING, settings, cores, paced_per_s=push_paced.offered_per_s
    )
    assert ceiling_paced is not None
    ceiling_1, _ = await _measure(CEILING, settings, 1)
    push_1, _ = await _measure("worker", settings, 1, *serve)
    naive_settings = bench_settings(await fresh_database("utxoiq_bench_push_naive"))
    naive, _ = await _measure("bench.naive_push", naive_settings, 1)
    report("push", "req_per_s", push.per_s, f"empty_server_{cores}_processes", ceiling.per_s)
    report("push", "req_per_s", push.per_s, "naive_endpoint", naive.per_s)
    report("push", "req_per_s_1_process", push_1.per_s, "empty_server_1_process", ceiling_1.per_s)
    report("push", "p99_ms", push.p99_ms)
    report("push", "p99_ms_1_process", push_1.p99_ms)
    paced.report_against("push", "paced", push_paced, ceiling_paced)
