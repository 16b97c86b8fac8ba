"""Fault scenarios 1 and 4: the worker process dies, alone or next to another one.

- Crashes: one worker (``run``, every topic) is SIGKILLed twice (three times in
  ``make soak``) at seeded random moments and restarted at once, and dies once at each
  crash point (``before_commit``, ``after_commit``, ``after_publish``:
  ``WORKER_CRASH_AT``), all while phase 1 is published at a steady rate.
- Two workers share the subscriptions; midway one is SIGKILLed for good and the
  other finishes alone. Both must have committed messages before the kill (their
  own OpenTelemetry counters, received over OTLP), so the load really was shared.

Each ends with the verdict of ``tests/faults/scenario.py``: 0 lost, 0 applied twice,
every poison in its dead-letter topic and nothing else there, the Redis invariant
once idle. ``FAULT_MESSAGES`` and ``FAULT_SEED`` set the size and the seed (the
seed also places the kills); ``make soak`` loops the scenarios with bigger sizes
and other seeds.

What a dead worker held comes back once its ack deadline (10 s) expired, one delivery
attempt spent. The faults are placed so that no worker dies while that happens
(``REDELIVERY_WINDOW_S``): a message is held by at most one dying process per fault
and by none twice. Pub/Sub would dead-letter a message after 5 attempts, but the
emulator already loses it (neither delivered again nor dead-lettered) once a third
delivery went unacknowledged, so more would test the emulator, not the worker.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as metrics_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as trace_pb2

from tests.faults.checks import asyncpg_dsn
from tests.faults.processes import Processes, WorkerProcess, worker_environment
from tests.faults.scenario import Scenario
from tests.support.topics import INGEST_TOPICS
from worker.config import Settings
from worker.pipeline.crash_points import PIPELINE_POINTS, CrashPoint
from worker.pubsub.client import PubSub

SEED = int(os.environ.get("FAULT_SEED", "20261122"))
MESSAGES = int(os.environ.get("FAULT_MESSAGES", "3000"))

SIGKILLED = -signal.SIGKILL
CRASH_ARMED = "crash point armed: this process will SIGKILL itself (tests only)"
CRASH_REACHED = "crash point reached, killing the process"


def timeout_for(messages: int) -> float:
    """A scenario's time limit: bigger workloads (``make soak``) get more."""
    return 240 + messages / 50


def phase1_for(messages: int, planned_s: float, max_rate_per_s: float) -> float:
    """How long phase 1 lasts: ``planned_s``, longer if ``messages`` in that time would
    need more than ``max_rate_per_s``."""
    return max(planned_s, messages / max_rate_per_s)


def assert_alive(worker: WorkerProcess) -> None:
    assert worker.alive, f"{worker.name} exited ({worker.returncode}):\n{worker.log_tail()}"
    assert not worker.logged("batch failed unexpectedly"), worker.log_tail()


STATE_SQL = """
SELECT count(*), md5(coalesce(string_agg(line, E'\\n' ORDER BY line), '')) FROM (
    SELECT b::text AS line FROM backfill_jobs AS b
    UNION ALL SELECT f::text FROM insight_feedback AS f
    UNION ALL SELECT m::text FROM system_metric_ids AS m
) AS rows
"""


async def stored_state(scenario: Scenario) -> tuple[int, str]:
    """How many rows the three tables hold now, and a digest of their contents: it
    changes with any committed insert or update."""
    conn = await asyncpg.connect(asyncpg_dsn(scenario.dsn), timeout=10)
    try:
        rows, digest = await conn.fetchrow(STATE_SQL)
    finally:
        await conn.close()
    return int(rows), str(digest)


# -- scenario 1: SIGKILLs and crash points ---------------------------------------------

CRASH_FIRST_S = 3.0
CRASH_GAP_S = (2.0, 5.0)
"""Seconds from the end of one fault to the start of the next (seeded), unless the
rule below pushes it later."""
REDELIVERY_WINDOW_S = (9.0, 15.0)
"""When, after a worker died, Pub/Sub hands out again what it held: its ack deadline
(10 s) expired, plus the retry backoff. No worker dies in that window, so what comes
back goes to a live worker: each message has at most two unacknowledged deliveries
(the worker that died holding it and, maybe, a pull of that worker the emulator had
not yet seen end), and the emulator loses a message at the third."""
KILL_DEATH_S = (0.0, 0.1)
CRASH_DEATH_S = (1.0, 3.0)
"""When the worker dies after a fault starts: a SIGKILL at once; a crash point stops
the worker (SIGTERM), starts an armed one and waits for its n-th batch there."""
KILL_SPAN_S = 1.5
CRASH_SPAN_S = 4.0
"""How long a fault takes at most, its successor worker started."""
PHASE1_TAIL_S = 10.0
CRASH_MAX_RATE_PER_S = 400.0


@dataclass(frozen=True)
class Crash:
    point: CrashPoint | None
    """None: a SIGKILL from outside, at a random moment."""
    on_hit: int
    gap_s: float

    @property
    def crash_at(self) -> str:
        assert self.point is not None
        return f"{self.point.value}:{self.on_hit}"

    @property
    def death_s(self) -> tuple[float, float]:
        return KILL_DEATH_S if self.point is None else CRASH_DEATH_S

    @property
    def span_s(self) -> float:
        return KILL_SPAN_S if self.point is None else CRASH_SPAN_S


# `make soak` kills three times a round; `make test` twice, within its time budget.
SIGKILLS = 3 if os.environ.get("FAULT_SOAK") else 2


def crash_plan(rng: random.Random) -> list[Crash]:
    """``SIGKILLS`` SIGKILLs and the three crash points (each on its 1st to 3rd batch
    there), in a seeded order, with seeded gaps."""
    kinds: list[CrashPoint | None] = [*[None] * SIGKILLS, *PIPELINE_POINTS]
    rng.shuffle(kinds)
    return [Crash(point, rng.randint(1, 3), rng.uniform(*CRASH_GAP_S)) for point in kinds]


def clear_of_redeliveries(
    start_s: float, death_s: tuple[float, float], deaths: list[tuple[float, float]]
) -> float:
    """The first moment from ``start_s`` at which a fault that dies within ``death_s``
    of its start dies outside the redelivery window of every earlier death (each a
    range of moments: a point once it happened)."""
    low, high = REDELIVERY_WINDOW_S
    while True:
        for earliest, latest in deaths:
            if start_s + death_s[0] < latest + high and start_s + death_s[1] > earliest + low:
                start_s = latest + high - death_s[0]
                break
        else:
            return start_s


def planned_end(moment: float, plan: list[Crash], deaths: list[tuple[float, float]]) -> float:
    """When phase 1 must end for every fault of ``plan`` to land mid-traffic (an
    armed worker needs batches to die on), if the first may start at ``moment``, each
    takes its longest and the redelivery windows of ``deaths`` are kept clear."""
    deaths, end = list(deaths), moment
    for crash in plan:
        moment = clear_of_redeliveries(moment, crash.death_s, deaths)
        deaths.append((moment + crash.death_s[0], moment + crash.death_s[1]))
        end = moment + crash.span_s
        moment = end + crash.gap_s
    return end + PHASE1_TAIL_S


@pytest.mark.timeout(timeout_for(MESSAGES))
async def test_scenario_worker_sigkilled_and_crashing_at_each_crash_point(
    fault_settings: Settings, fault_pubsub: PubSub, processes: Processes
) -> None:
    env = worker_environment(fault_settings)
    plan = crash_plan(random.Random(SEED))
    phase1_s = phase1_for(MESSAGES, planned_end(CRASH_FIRST_S, plan, []), CRASH_MAX_RATE_PER_S)
    scenario = Scenario.create(
        "worker-crashes", fault_settings, fault_pubsub, seed=SEED, messages=MESSAGES
    )
    started = 0

    async def start(crash_at: str | None = None) -> WorkerProcess:
        nonlocal started
        started += 1
        armed = worker_environment(fault_settings, crash_at=crash_at) if crash_at else env
        return await processes.start_worker(armed, name=f"worker-{started}")

    def now_s() -> float:
        return time.monotonic() - scenario.started

    worker = await start()
    deaths: list[tuple[float, float]] = []
    crashed: dict[CrashPoint, WorkerProcess] = {}
    changed: dict[CrashPoint, bool] = {}
    async with scenario.reading(seed=SEED), scenario.publishing(MESSAGES / phase1_s) as pacing:
        moment = CRASH_FIRST_S
        for done, crash in enumerate(plan, start=1):
            await scenario.at(clear_of_redeliveries(moment, crash.death_s, deaths))
            assert_alive(worker)
            if crash.point is None:
                assert await worker.kill() == SIGKILLED
                deaths.append((now_s(), now_s()))
                scenario.fault(f"{worker.name} SIGKILLed")
                worker = await start()
            else:
                # Stopped gracefully (nothing it held is lost), then armed: it must
                # die by itself, at that point, on its n-th batch there.
                assert await worker.terminate() == 0, worker.log_tail()
                before = await stored_state(scenario)
                armed = await start(crash.crash_at)
                assert armed.logged(CRASH_ARMED), armed.log_tail()
                code = await armed.wait_exit(60)
                deaths.append((now_s(), now_s()))
                assert code == SIGKILLED, f"{armed.name} exited {code}:\n{armed.log_tail()}"
                [reached] = armed.logged(CRASH_REACHED)
                assert (reached["crash_point"], reached["hit"]) == (
                    crash.point.value,
                    crash.on_hit,
                )
                changed[crash.point] = await stored_state(scenario) != before
                crashed[crash.point] = armed
                scenario.fault(f"{armed.name} died at WORKER_CRASH_AT={crash.crash_at}")
                worker = await start()
            moment = now_s() + crash.gap_s
            # A fault that took longer than planned (a slow start on a loaded machine)
            # pushes the rest later, the redelivery windows with them: phase 1 lasts
            # until they are done, a little slower.
            pacing.last_no_earlier_than(scenario.started + planned_end(moment, plan[done:], deaths))

    verdict = await scenario.verdict()
    assert_alive(worker)
    verdict.assert_ok()
    assert set(crashed) == set(PIPELINE_POINTS)
    # Killed after its commit and before any ack: what it committed stayed committed
    # (the database changed while only it ran), and its messages came back to the next
    # worker, which applied them again with no second effect (the verdict's 0 doubled).
    assert changed[CrashPoint.AFTER_COMMIT] and changed[CrashPoint.AFTER_PUBLISH], changed
    assert len(verdict.faults) == len(plan)


# -- scenario 4: two workers, one SIGKILLed for good -----------------------------------

COMMITTED = "worker.messages.committed"
TWO_PHASE1_S = 16.0
TWO_KILL_S = 8.0
TWO_MAX_RATE_PER_S = 600.0
EXPORT_INTERVAL_MS = 500


class OtlpReceiver:
    """A loopback OTLP/gRPC endpoint keeping each worker's latest counter values.

    Workers export cumulative sums every ``EXPORT_INTERVAL_MS``; ``service.instance.id``
    (``OTEL_RESOURCE_ATTRIBUTES``) tells them apart. Spans are accepted and dropped.
    """

    def __init__(self) -> None:
        # instance -> metric name -> topic -> value
        self.sums: dict[str, dict[str, dict[str, int]]] = {}
        self.port = 0
        self._server: Any = None

    async def start(self) -> None:
        metrics = grpc.unary_unary_rpc_method_handler(
            self._export_metrics,
            request_deserializer=metrics_pb2.ExportMetricsServiceRequest.FromString,
            response_serializer=metrics_pb2.ExportMetricsServiceResponse.SerializeToString,
        )
        spans = grpc.unary_unary_rpc_method_handler(
            self._export_spans,
            request_deserializer=trace_pb2.ExportTraceServiceRequest.FromString,
            response_serializer=trace_pb2.ExportTraceServiceResponse.SerializeToString,
        )
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "opentelemetry.proto.collector.metrics.v1.MetricsService",
                    {"Export": metrics},
                ),
                grpc.method_handlers_generic_handler(
                    "opentelemetry.proto.collector.trace.v1.TraceService", {"Export": spans}
                ),
            )
        )
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)

    def environment(self, instance: str) -> dict[str, str]:
        """What makes a worker export to this receiver as ``instance``."""
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.port}",
            "OTEL_METRIC_EXPORT_INTERVAL": str(EXPORT_INTERVAL_MS),
            "OTEL_RESOURCE_ATTRIBUTES": f"service.instance.id={instance}",
        }

    def total(self, instance: str, metric: str = COMMITTED) -> int:
        """The latest value of ``metric`` for ``instance``, summed over the ingest
        topics (the Redis updater's own messages are not counted)."""
        by_topic = self.sums.get(instance, {}).get(metric, {})
        return sum(by_topic.get(topic, 0) for topic in INGEST_TOPICS)

    async def _export_metrics(
        self, request: metrics_pb2.ExportMetricsServiceRequest, context: Any
    ) -> metrics_pb2.ExportMetricsServiceResponse:
        for resource_metrics in request.resource_metrics:
            attributes = {a.key: a.value.string_value for a in resource_metrics.resource.attributes}
            instance = attributes.get("service.instance.id", "")
            for scope in resource_metrics.scope_metrics:
                for metric in scope.metrics:
                    if not metric.HasField("sum"):
                        continue
                    by_topic = self.sums.setdefault(instance, {}).setdefault(metric.name, {})
                    for point in metric.sum.data_points:
                        labels = {a.key: a.value.string_value for a in point.attributes}
                        topic = labels.get("topic", "")
                        by_topic[topic] = max(by_topic.get(topic, 0), point.as_int)
        return metrics_pb2.ExportMetricsServiceResponse()

    async def _export_spans(
        self, request: trace_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_pb2.ExportTraceServiceResponse:
        return trace_pb2.ExportTraceServiceResponse()


@pytest.mark.timeout(timeout_for(MESSAGES))
async def test_scenario_two_workers_and_one_sigkilled_for_good(
    fault_settings: Settings, fault_pubsub: PubSub, processes: Processes
) -> None:
    receiver = OtlpReceiver()
    await receiver.start()
    try:
        workers = [
            await processes.start_worker(
                worker_environment(fault_settings, **receiver.environment(name)), name=name
            )
            for name in ("worker-a", "worker-b")
        ]
        survivor, victim = random.Random(SEED).sample(workers, 2)
        phase1_s = phase1_for(MESSAGES, TWO_PHASE1_S, TWO_MAX_RATE_PER_S)
        scenario = Scenario.create(
            "two-workers", fault_settings, fault_pubsub, seed=SEED, messages=MESSAGES
        )
        async with scenario.reading(seed=SEED), scenario.publishing(MESSAGES / phase1_s):
            await scenario.at(phase1_s * TWO_KILL_S / TWO_PHASE1_S)
            for worker in workers:
                assert_alive(worker)
            shared = {w.name: receiver.total(w.name) for w in workers}
            assert await victim.kill() == SIGKILLED
            scenario.fault(f"{victim.name} SIGKILLed for good ({shared} committed so far)")

        verdict = await scenario.verdict()
        assert_alive(survivor)
        verdict.assert_ok()
        # Both workers committed messages before the kill: the load was shared.
        assert all(count > 0 for count in shared.values()), shared
        # And the survivor went on alone: it committed more after the kill.
        await asyncio.sleep(2 * EXPORT_INTERVAL_MS / 1000)
        assert receiver.total(survivor.name) > shared[survivor.name], receiver.sums
    finally:
        await receiver.stop()
