"""Scenario ``cpu``: the worker's CPU time per message, read from ``/proc``.

On real Pub/Sub the emulator's share of the machine is gone and the worker's own CPU
is what limits a pod, so this is measured apart from throughput: for each topic a
backlog (``METRICS`` single-sample metrics messages, ``FEEDBACK`` feedback events)
drained by ``utxoiq-worker run --only TOPIC``, its process's user + system time
(every thread: gRPC's included) from its start to the last row, per message. The
baseline, in the same round: the bare pull-and-ack loop's own CPU per message over
the same backlog, in this process (``time.process_time``), which is the least any
consumer on this client pays. Figures are medians of ``ROUNDS`` interleaved rounds.

The whole process's figure moves with the machine (the emulator, PostgreSQL and gRPC
share its cores). A steadier one for the handlers' own Python: each topic's decode and
``parse`` of the same payloads in this process, best of ``PASSES`` passes over
``PARSED`` payloads, against ``orjson.loads`` of them alone (the least a consumer of
JSON pays).

And the handler's whole share, for the split of the worker's figure: decode, ``parse``
and ``apply`` (its statement and transaction, on the worker's engine) of the same
backlog in this process, in batches of ``HANDLER_BATCH``, without Pub/Sub or the
pipeline (``handler_us_per_{topic}_message``). The bare loop plus this is what a
worker made of these parts would pay with no runtime at all
(``floor_us_per_{topic}_message``, against the worker's figure of the same rounds):
what the runtime itself costs is the difference.
"""

from __future__ import annotations

import os
import statistics
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import NamedTuple

import orjson

from bench.common import fresh_database, report, scratch_settings
from bench.drain import feedback_payloads, metric_payloads, raw_pull_ceiling, warm_up_emulator
from bench.stack import (
    bench_settings,
    fresh_topology,
    publish_all,
    start_worker,
    stop_process,
    wait_for_rows,
)
from handlers import registry
from handlers.feedback import FeedbackHandler
from handlers.metrics import MetricsHandler
from worker.config import Settings
from worker.pipeline.decoding import decode_json_object
from worker.pubsub.client import PubSub
from worker.runtime import Runtime
from worker.sources.settings import PullSettings

METRICS = 60_000
FEEDBACK = 30_000
ROUNDS = 3
DATABASE = "utxoiq_bench_cpu"


class _Drained(NamedTuple):
    """A topic as this scenario drains and parses it."""

    messages: int
    payloads: Callable[[int, str], list[bytes]]
    table: str
    handler: Callable[[], MetricsHandler | FeedbackHandler]


TOPICS: dict[str, _Drained] = {
    "metrics": _Drained(METRICS, metric_payloads, "system_metrics", MetricsHandler),
    "feedback": _Drained(FEEDBACK, feedback_payloads, "insight_feedback", FeedbackHandler),
}


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid``, all its threads."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # utime and stime: fields 14 and 15 of proc(5), 12 and 13 after the command.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _worker_us(settings: Settings, pubsub: PubSub, topic: str) -> float:
    count, payloads, table, _ = TOPICS[topic]
    await fresh_database(DATABASE)
    await publish_all(pubsub, topic, payloads(count, uuid.uuid4().hex[:6]))
    worker = start_worker(settings, "--only", topic)
    try:
        before = cpu_s(worker.pid)
        await wait_for_rows(settings, f"SELECT count(*) FROM {table}", count)
        used = cpu_s(worker.pid) - before
    finally:
        stop_process(worker)
    return used / count * 1e6


async def _bare_loop_us(pubsub: PubSub, topic: str, pullers: int) -> float:
    count, payloads, _, _ = TOPICS[topic]
    await publish_all(pubsub, topic, payloads(count, "bare"))
    before = time.process_time()
    await raw_pull_ceiling(pubsub, f"{topic}-worker", count, pullers)
    return (time.process_time() - before) / count * 1e6


PARSED = 20_000
PASSES = 5


def _parse_us(topic: str) -> tuple[float, float]:
    """(decode + ``parse``, ``orjson.loads`` alone) in µs per payload of ``topic``."""
    drained = TOPICS[topic]
    data = drained.payloads(min(drained.messages, PARSED), "parse")
    handler = drained.handler()
    published_at = datetime.now(UTC)

    def parse_all() -> None:
        for item in data:
            handler.parse(decode_json_object(item), published_at)

    def loads_all() -> None:
        for item in data:
            orjson.loads(item)

    def best_us(work: Callable[[], None]) -> float:
        spent = []
        for _ in range(PASSES):
            before = time.process_time()
            work()
            spent.append(time.process_time() - before)
        return min(spent) / len(data) * 1e6

    return best_us(parse_all), best_us(loads_all)


HANDLER_BATCH = 1000


async def _handler_us(settings: Settings, topic: str) -> float:
    """Decode, ``parse`` and ``apply`` of the worker's backlog in this process, in
    batches of ``HANDLER_BATCH``: µs of this process's CPU per message. The handler,
    its start-up hook and its engine are the worker's (a ``Runtime``'s)."""
    count, payloads, table, _ = TOPICS[topic]
    await fresh_database(DATABASE)
    runtime = Runtime(settings, registry())
    try:
        await runtime.prepare([topic])
        handler = runtime.registry[topic].build_handler(runtime)
        data, published_at = payloads(count, uuid.uuid4().hex[:6]), datetime.now(UTC)
        before = time.process_time()
        for start in range(0, count, HANDLER_BATCH):
            items = [
                handler.parse(decode_json_object(item), published_at)
                for item in data[start : start + HANDLER_BATCH]
            ]
            await handler.apply(runtime.engine, items)
        spent = time.process_time() - before
    finally:
        await runtime.close()
    await wait_for_rows(settings, f"SELECT count(*) FROM {table}", count, timeout_s=5)
    return spent / count * 1e6


async def run() -> None:
    settings = bench_settings(scratch_settings(DATABASE))
    pubsub = await fresh_topology(settings)
    pullers = PullSettings().pullers
    try:
        await warm_up_emulator(pubsub, pullers)
        for topic in TOPICS:
            workers, bare, handler = [], [], []
            for _ in range(ROUNDS):
                bare.append(await _bare_loop_us(pubsub, topic, pullers))
                workers.append(await _worker_us(settings, pubsub, topic))
                handler.append(await _handler_us(settings, topic))
            worker_us = statistics.median(workers)
            report(
                "cpu",
                f"worker_cpu_us_per_{topic}_message",
                worker_us,
                "bare_pull_ack_loop",
                statistics.median(bare),
                rounds=list(zip(workers, bare, strict=True)),
            )
            # Each round's parts against that round's worker: the ratio is their share.
            report(
                "cpu",
                f"handler_us_per_{topic}_message",
                statistics.median(handler),
                f"worker_cpu_us_per_{topic}_message",
                worker_us,
                rounds=list(zip(handler, workers, strict=True)),
            )
            floors = [b + h for b, h in zip(bare, handler, strict=True)]
            report(
                "cpu",
                f"floor_us_per_{topic}_message",
                statistics.median(floors),
                f"worker_cpu_us_per_{topic}_message",
                worker_us,
                rounds=list(zip(floors, workers, strict=True)),
            )
            parse_us, loads_us = _parse_us(topic)
            report("cpu", f"parse_us_per_{topic}_message", parse_us, "orjson_loads", loads_us)
    finally:
        await pubsub.close()
