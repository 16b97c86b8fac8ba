"""``utxoiq-worker dlq`` as an operator runs it (issue 18): stats and list, purge only
with --yes, a replay killed midway and run again: nothing lost, every effect once."""

from __future__ import annotations

import asyncio
import json
import signal

from sqlalchemy.ext.asyncio import AsyncEngine

from tests.acceptance.test_cli import cli_env, run_cli
from tests.support.emulator import Outgoing, message, publish, running_worker, wait_for_count
from tests.support.factories import feedback_payload
from tests.support.topics import REGISTRY
from worker.config import Settings
from worker.dlq.operations import DeadLetters
from worker.pubsub.client import PubSub
from worker.pubsub.names import dead_letter_topic

MESSAGES = 30
LEASE_S = 10  # a killed replay's dead letters come back this soon (DLQ_LEASE; 10 s at least)


def outage_letter(n: int) -> Outgoing:
    """A valid feedback event the worker dead-lettered while its database was out (as
    an operator finds it after an outage that outlasted the retries)."""
    return message(
        feedback_payload(user_id=f"user-{n}", rating=1 + n % 5),
        dead_letter_reason="conflict",
        dead_letter_detail="stand-in for a cause since fixed",
        source_topic="feedback",
        source_subscription="feedback-worker",
        source_message_id=str(1000 + n),
        source_publish_time="2026-11-27T10:00:00Z",
        failed_at="2026-11-27T10:00:01Z",
    )


async def test_an_operator_inspects_then_replays_and_a_killed_replay_loses_nothing(
    pubsub_settings: Settings, pubsub: PubSub, engine: AsyncEngine
) -> None:
    await publish(
        pubsub, dead_letter_topic("feedback"), [outage_letter(n) for n in range(MESSAGES)]
    )
    env = cli_env(pubsub_settings, DLQ_LEASE=str(LEASE_S), LOG_LEVEL="WARNING")

    code, out = await run_cli(env, "dlq", "stats", "feedback")
    assert code == 0 and "conflict" in out and f"{MESSAGES:>7}" in out, out
    code, out = await run_cli(env, "dlq", "list", "feedback", "--json", "--limit", "5")
    assert code == 0 and len(out.splitlines()) == 5, out
    assert {json.loads(line)["source_message_id"] for line in out.splitlines()} <= {
        str(1000 + n) for n in range(MESSAGES)
    }
    code, out = await run_cli(env, "dlq", "purge", "feedback")
    assert code == 2, out  # refused without --yes

    async with running_worker(pubsub_settings, topics=("feedback",)):
        # Killed after its 2nd batch's publish (10 a batch at --rate 100), before its ack.
        code, out = await run_cli(
            {**env, "WORKER_CRASH_AT": "replay_after_publish:2"},
            "dlq",
            "replay",
            "feedback",
            "--rate",
            "100",
        )
        assert code == -signal.SIGKILL, (code, out)
        await asyncio.sleep(LEASE_S + 1)  # the dead replay's leases lapse
        code, out = await run_cli(env, "dlq", "replay", "feedback")
        assert code == 0 and f"feedback: {MESSAGES - 10} replayed, 0 skipped" in out, out

        # Every message applied (ten of them twice: once is their effect).
        await wait_for_count(engine, "SELECT count(*) FROM insight_feedback", MESSAGES)
    assert await DeadLetters(pubsub, REGISTRY).list("feedback") == []
    async with engine.connect() as conn:
        rows = (await conn.exec_driver_sql("SELECT user_id, rating FROM insight_feedback")).all()
    assert sorted(rows) == sorted((f"user-{n}", 1 + n % 5) for n in range(MESSAGES))
