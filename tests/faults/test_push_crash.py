"""Fault scenario 5: the push server's processes die mid-run, then the whole server,
and it comes back on its port.

``utxoiq-worker serve`` on two processes (``PUSH_AUTH=disabled``: the emulator sends
no token) is fed by push subscriptions of the emulator, ``cache-invalidation``
included (the Redis updater is a push subscription to ``/push/cache-invalidation`` in
push mode). While phase 1 is published, one of its processes is SIGKILLed with
requests in flight (its supervisor starts it again while the other serves on), then
the supervisor itself (its processes die with it), and the server is started again
on the same port; the emulator retries what got no 204. The verdict of
``tests/faults/scenario.py`` must hold: 0 lost, 0 applied twice, every poison in its
dead-letter topic and nothing else there, the Redis invariant once idle.

The emulator pushes through a front (a TCP proxy, as Cloud Run's front end is): while
``serve`` restarts, new requests wait there instead of being refused. The emulator
drops messages whose pushes are refused for more than about a second: neither
delivered once the endpoint is back nor dead-lettered (Pub/Sub would retry them by
the retry policy and dead-letter them after 5 attempts), so a refused port would
test the emulator, not ``serve``. The requests in flight when ``serve`` dies still
fail and are retried.

The front also records every push and its answer (``tests/faults/push_front.py``):
the emulator pushes one request at a time per subscription, so ``serve`` drains
phase 1 long after it was published (minutes on a busy machine), and the verdict
waits as long as pushes are still acknowledged. If rows are still missing then, the
verdict tells whose fault it is: a message ``serve`` answered 204 whose row is not
stored fails the test; messages the emulator never pushed, or stopped pushing after
failed pushes, mark it xfail (the emulator's bug, not ``serve``'s).

``FAULT_MESSAGES`` and ``FAULT_SEED`` set the size and the seed (``make soak``).
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
from google.auth.credentials import AnonymousCredentials
from google.pubsub_v1 import SubscriberAsyncClient

from tests.faults.conftest import FAULT_REDELIVERY
from tests.faults.postgres import free_port
from tests.faults.processes import Processes, wait_gone, worker_environment
from tests.faults.proxy import TcpProxy
from tests.faults.push_front import PushRecorder
from tests.faults.scenario import Scenario
from tests.faults.test_crashes import (
    SEED,
    phase1_for,
    stored_state,
    timeout_for,
)
from tests.support.topics import REGISTRY
from worker.config import Settings
from worker.pubsub import topology
from worker.pubsub.client import PubSub, subscription_path

MESSAGES = int(os.environ.get("FAULT_MESSAGES", "2000"))
SIGKILLED = -signal.SIGKILL

PUSH_PHASE1_S = 12.0
PROCESS_KILL_S = 3.0
PUSH_KILL_S = 7.0
PROCESSES = 2
# The emulator pushes about 700 requests/s at best, and every committed batch adds
# an invalidation push: phase 1 stays well under that.
PUSH_MAX_RATE_PER_S = 250.0


async def push_endpoints(settings: Settings) -> dict[str, str]:
    """Each worker subscription's push endpoint ("" for a pull subscription)."""
    subscriber: Any = SubscriberAsyncClient(credentials=AnonymousCredentials())  # type: ignore[no-untyped-call]
    endpoints = {}
    try:
        for spec in REGISTRY:
            found = await subscriber.get_subscription(
                subscription=subscription_path(settings.google_cloud_project, spec.subscription)
            )
            endpoints[spec.subscription] = found.push_config.push_endpoint
    finally:
        await subscriber.transport.close()
    return endpoints


@pytest.mark.timeout(timeout_for(MESSAGES))
async def test_scenario_push_server_sigkilled_and_restarted_on_its_port(
    fault_settings: Settings, fault_pubsub: PubSub, processes: Processes
) -> None:
    port = free_port()
    env = worker_environment(fault_settings, WORKER_PROCESSES=str(PROCESSES))
    server = await processes.start_server(env, port, name="serve-1")
    assert len(server.served_by()) == PROCESSES, server.log_tail()
    pushes = PushRecorder()
    with TcpProxy(port, observer=pushes) as front:
        # The fixture applied a pull topology: the same subscriptions become push ones.
        endpoint = f"http://127.0.0.1:{front.port}"
        await topology.apply(
            fault_settings, REGISTRY, push_endpoint=endpoint, redelivery=FAULT_REDELIVERY
        )
        assert await push_endpoints(fault_settings) == {
            spec.subscription: f"{endpoint}/push/{spec.name}" for spec in REGISTRY
        }
        phase1_s = phase1_for(MESSAGES, PUSH_PHASE1_S, PUSH_MAX_RATE_PER_S)
        scenario = Scenario.create(
            "push-server-killed", fault_settings, fault_pubsub, seed=SEED, messages=MESSAGES
        )
        async with scenario.reading(seed=SEED), scenario.publishing(MESSAGES / phase1_s):
            await scenario.at(phase1_s * PROCESS_KILL_S / PUSH_PHASE1_S)
            victim = server.served_by()[0]
            os.kill(victim, signal.SIGKILL)
            scenario.fault(f"one process of serve SIGKILLed (pid {victim})")
            # The other process serves on meanwhile: the front is never paused.
            await server.wait_for_log(
                lambda e: (
                    e.get("message") == "process serving"
                    and e.get("index") == 0
                    and e.get("pid") != victim
                )
            )
            scenario.fault("its supervisor started it again")

            await scenario.at(phase1_s * PUSH_KILL_S / PUSH_PHASE1_S)
            assert server.alive, server.log_tail()
            before_kill, _ = await stored_state(scenario)
            children = list(server.served_by().values())
            assert await server.kill() == SIGKILLED
            # The requests in flight failed with the processes; new ones wait at the
            # front until the server listens again.
            front.pause()
            scenario.fault(f"serve's supervisor SIGKILLed ({before_kill} rows stored)")
            try:
                await wait_gone(children)  # they die with it, freeing the port
                server = await processes.start_server(env, port, name="serve-2")
            finally:
                front.resume()
            scenario.fault("serve started again on the same port")

        # A minute of the time limit is left for phase 2's checks and the teardown.
        verdict = await scenario.verdict(pushes=pushes, deadline_s=timeout_for(MESSAGES) - 60)
    assert server.alive, server.log_tail()
    verdict.assert_ok()
    # The first server did take pushes before it died (only it ran until then).
    assert before_kill > 0
