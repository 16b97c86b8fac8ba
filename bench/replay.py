"""Scenario ``replay``: ``DeadLetters.replay`` of 50k dead letters of ``feedback``.

The dead-letter subscription is filled with ``LETTERS`` messages as the worker
dead-letters them (a feedback payload, the ``dead_letter_*`` and ``source_*``
attributes). Figures, each with its baseline from the same run:

- ``replay_msgs_per_s``: the letters over the wall time of one replay (pulls leasing
  the letters while batches of 1000 of those already pulled are published to
  ``feedback``, each acknowledged once its publish is confirmed; the subscription empty
  at the end, checked), against
  ``raw_publish_msgs_per_s``: the same messages (data and replay attributes) published
  to ``feedback`` with the raw client, in the same requests of 1000, one at a time.
  Goal: ratio >= 0.5;
- the same replay figure against ``raw_pull_ack_msgs_per_s``: the same dead letters
  published again, then pulled by ``PULLERS`` concurrent raw pulls and acknowledged,
  nothing else: the least any replay pays on the emulator, which returns at most 100
  messages a pull.

The emulator first takes an unmeasured round of the same publishes (its JVM compiles
its hot paths over the first few hundred thousand messages; see README, drain).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

from bench.common import report
from bench.stack import bench_settings, fresh_topology
from handlers import registry
from worker.config import Settings
from worker.dlq.leases import PULL_TIMEOUT_S, PULLERS
from worker.dlq.letters import replay_attributes
from worker.dlq.operations import DeadLetters
from worker.pubsub.client import PubSub, PubsubMessage
from worker.pubsub.names import dead_letter_subscription, dead_letter_topic

SCENARIO = "replay"
LETTERS = 50_000
REQUEST = 1000


def say(text: str) -> None:
    print(f"replay: {text}", file=sys.stderr, flush=True)


def _letter(n: int) -> tuple[bytes, dict[str, str]]:
    payload = {
        "insight_id": f"insight-{n % 500}",
        "user_id": f"user-{n}",
        "rating": 9,
        "comment": "a comment of a few words, as most are",
        "flag_type": None,
        "flag_reason": None,
        "occurred_at": "2026-11-27T10:00:00Z",
    }
    attributes = {
        "trace": f"t-{n}",
        "dead_letter_reason": "schema_violation",
        "dead_letter_detail": "rating: Input should be less than or equal to 5",
        "source_topic": "feedback",
        "source_subscription": "feedback-worker",
        "source_message_id": str(10_000_000 + n),
        "source_publish_time": "2026-11-27T10:00:01Z",
        "failed_at": "2026-11-27T10:00:02Z",
    }
    return json.dumps(payload).encode(), attributes


async def _publish(pubsub: PubSub, topic: str, messages: list[Any]) -> float:
    """Publish ``messages`` in requests of ``REQUEST``, one at a time; seconds."""
    started = time.perf_counter()
    target = pubsub.topic(topic)
    for at in range(0, len(messages), REQUEST):
        await pubsub.publish(target, messages[at : at + REQUEST], timeout_s=120)
    return time.perf_counter() - started


async def run() -> None:
    settings = bench_settings(Settings.from_env())
    pubsub = await fresh_topology(settings)
    try:
        letters = [_letter(n) for n in range(LETTERS)]
        dead = [PubsubMessage(data=d, attributes=a) for d, a in letters]
        now = datetime.now(UTC)
        replayed = [
            PubsubMessage(data=d, attributes=replay_attributes(a, 0, now)) for d, a in letters
        ]
        await _publish(pubsub, "feedback", replayed)  # the emulator's warm-up
        seconds = await _publish(pubsub, dead_letter_topic("feedback"), dead)
        say(f"{LETTERS:,} dead letters published in {seconds:.1f} s")
        baseline_s = await _publish(pubsub, "feedback", replayed)
        say(f"raw publish: {LETTERS:,} messages in {baseline_s:.1f} s")

        started = time.perf_counter()
        summary = await DeadLetters(pubsub, registry()).replay("feedback")
        replay_s = time.perf_counter() - started
        say(f"replay: {summary.replayed:,} messages in {replay_s:.1f} s")
        if (summary.replayed, summary.failed) != (LETTERS, 0):
            raise RuntimeError(f"replayed {summary.replayed}, failed {summary.failed}")
        left = await pubsub.pull(pubsub.subscription(dead_letter_subscription("feedback")), 10, 2)
        if left:
            raise RuntimeError(f"{len(left)} dead letters left after the replay")
        await _publish(pubsub, dead_letter_topic("feedback"), dead)
        drain_s = await _pull_and_ack(
            pubsub, pubsub.subscription(dead_letter_subscription("feedback"))
        )
        say(f"raw pull and ack: {LETTERS:,} messages in {drain_s:.1f} s")
        report(
            SCENARIO,
            "replay_msgs_per_s",
            LETTERS / replay_s,
            "raw_publish_msgs_per_s",
            LETTERS / baseline_s,
        )
        report(
            SCENARIO,
            "replay_msgs_per_s",
            LETTERS / replay_s,
            "raw_pull_ack_msgs_per_s",
            LETTERS / drain_s,
        )
    finally:
        await pubsub.close()


async def _pull_and_ack(pubsub: PubSub, subscription: str) -> float:
    """Drain ``subscription`` as ``Leases.pull_all`` does, acknowledging each pull;
    seconds until ``LETTERS`` were acknowledged."""
    started, done = time.perf_counter(), 0

    async def puller() -> None:
        nonlocal done
        while received := await pubsub.pull(subscription, REQUEST, PULL_TIMEOUT_S):
            await pubsub.acknowledge(subscription, [m.ack_id for m in received])
            done += len(received)

    await asyncio.gather(*(puller() for _ in range(PULLERS)))
    if done < LETTERS:
        raise RuntimeError(f"pulled {done} of {LETTERS}")
    return time.perf_counter() - started
