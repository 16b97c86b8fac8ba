"""Dead-letter operations against the emulator: each reason replayed once its cause is
fixed, Pub/Sub's own forwarding replayed after an outage, reading that consumes
nothing, purge by reason, a file that names an unknown dead letter refused, a replay
by reason streamed (each match once, the rest left)."""

from __future__ import annotations

import base64
import dataclasses
import json
import uuid
from pathlib import Path
from typing import Any

import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.emulator import (
    drain_dead_letters,
    message,
    publish,
    pull_all,
    running_worker,
    scalar,
    wait_for,
    wait_for_count,
)
from tests.support.factories import backfill_payload, feedback_payload
from tests.support.topics import REGISTRY
from worker.config import Settings
from worker.dlq.letters import Selection
from worker.dlq.operations import DeadLetters
from worker.exceptions import DeadLetterCommandError
from worker.pubsub import topology
from worker.pubsub.client import PubSub
from worker.pubsub.names import dead_letter_subscription, dead_letter_topic

FEEDBACK_ROWS = "SELECT count(*) FROM insight_feedback"


@pytest_asyncio.fixture(loop_scope="session")
async def letters(pubsub: PubSub) -> DeadLetters:
    return DeadLetters(pubsub, REGISTRY)


async def dead_lettered(letters: DeadLetters, topic: str, count: int) -> None:
    """Wait until ``topic``'s dead-letter subscription holds ``count`` messages."""

    async def held() -> int:
        return len(await letters.list(topic))

    await wait_for(held, lambda n: n >= count, what=f"{count} dead letters of {topic}")


async def test_listing_and_stats_consume_nothing(
    pubsub_settings: Settings, pubsub: PubSub, letters: DeadLetters
) -> None:
    bad = [message(b"{not json")] * 3 + [message(feedback_payload(rating=9))] * 2
    async with running_worker(pubsub_settings, topics=("feedback",)):
        await publish(pubsub, "feedback", bad)
        await dead_lettered(letters, "feedback", 5)

    for _ in range(2):  # the same counts each time: nothing was consumed
        (stats,) = await letters.stats(["feedback"])
        assert stats.by_reason == {"invalid_json": 3, "schema_violation": 2}
        assert stats.oldest_age_s is not None and stats.oldest_age_s >= (stats.newest_age_s or 0)
        listed = await letters.list("feedback", Selection(reason="schema_violation"))
        assert [letter.reason for letter in listed] == ["schema_violation"] * 2
        assert "rating" in listed[0].detail
    assert len(await drain_dead_letters(pubsub, "feedback", expected=5)) == 5


async def test_a_schema_violation_is_fixed_in_an_export_and_replayed_from_the_file(
    pubsub_settings: Settings,
    pubsub: PubSub,
    letters: DeadLetters,
    engine: AsyncEngine,
    tmp_path: Path,
) -> None:
    broken = [feedback_payload(user_id=f"u{n}", rating=9) for n in range(3)]
    async with running_worker(pubsub_settings, topics=("feedback",)):
        await publish(pubsub, "feedback", [message(p, trace="t1") for p in broken])
        await dead_lettered(letters, "feedback", 3)
        path = tmp_path / "feedback.jsonl"
        with path.open("w") as out:
            assert await letters.export("feedback", out) == 3
        fixed = []
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            payload = json.loads(_decoded(entry["data"]))
            fixed.append({**entry, "data": _encoded(json.dumps({**payload, "rating": 4}))})
        path.write_text("".join(json.dumps(entry) + "\n" for entry in fixed))

        summary = await letters.replay("feedback", from_file=path)

        assert (summary.replayed, summary.skipped, summary.failed) == (3, 0, 0)
        await wait_for_count(engine, FEEDBACK_ROWS, 3)
    assert await scalar(engine, "SELECT min(rating) FROM insight_feedback") == 4
    assert await letters.list("feedback") == []


async def test_a_conflict_is_replayed_once_the_stored_job_is_deleted(
    pubsub_settings: Settings, pubsub: PubSub, letters: DeadLetters, engine: AsyncEngine
) -> None:
    job = str(uuid.uuid4())
    async with running_worker(pubsub_settings, topics=("backfill-progress",)):
        await publish(pubsub, "backfill-progress", [backfill_payload(job_id=job)])
        await wait_for_count(engine, "SELECT count(*) FROM backfill_jobs", 1)
        other = backfill_payload(job_id=job, job_type="transactions", current_block=805001)
        await publish(pubsub, "backfill-progress", [other])
        await dead_lettered(letters, "backfill-progress", 1)
        (letter,) = await letters.list("backfill-progress")
        assert letter.reason == "conflict"

        async with engine.begin() as conn:  # the operator's fix: the wrong job goes
            await conn.execute(text("DELETE FROM backfill_jobs WHERE id = :id"), {"id": job})
        summary = await letters.replay("backfill-progress", Selection(reason="conflict"))

        assert summary.replayed == 1

        async def job_type() -> Any:
            return await scalar(engine, "SELECT max(job_type) FROM backfill_jobs")

        await wait_for(job_type, lambda kind: kind == "transactions", what="the replayed job")
    assert await letters.list("backfill-progress") == []


async def test_a_message_pubsub_gave_up_on_is_replayed_after_the_outage(
    pubsub_settings: Settings, pubsub: PubSub, engine: AsyncEngine
) -> None:
    # Retries at once, so that five failed deliveries take seconds, not minutes.
    project = dataclasses.replace(
        pubsub_settings, google_cloud_project=f"t-{uuid.uuid4().hex[:10]}"
    )
    await topology.apply(project, REGISTRY, redelivery=topology.Redelivery(min_retry_backoff_s=0))
    client = PubSub(project)
    try:
        letters = DeadLetters(client, REGISTRY)
        await publish(client, "feedback", [feedback_payload()])
        source = client.subscription("feedback-worker")

        async def fail_a_delivery() -> int:  # the database is down: every try is nacked
            received = await client.pull(source, 10, 1.0)
            if received:
                await client.modify_ack_deadline(source, [m.ack_id for m in received], 0)
            return len(await letters.list("feedback"))

        await wait_for(fail_a_delivery, lambda n: n == 1, timeout_s=60, what="forwarding")
        (letter,) = await letters.list("feedback")
        assert letter.reason == "delivery_attempts_exceeded"
        assert letter.attributes["CloudPubSubDeadLetterSourceSubscription"] == "feedback-worker"

        async with running_worker(project, topics=("feedback",)):  # the database is back
            assert (await letters.replay("feedback")).replayed == 1
            await wait_for_count(engine, FEEDBACK_ROWS, 1)
        assert await letters.list("feedback") == []
    finally:
        await client.close()


async def test_a_replay_that_fails_again_is_dead_lettered_with_its_count(
    pubsub_settings: Settings, pubsub: PubSub, letters: DeadLetters
) -> None:
    async with running_worker(pubsub_settings, topics=("feedback",)):
        await publish(pubsub, "feedback", [message(feedback_payload(rating=0))])
        for round_no in (1, 2, 3):
            await dead_lettered(letters, "feedback", 1)
            assert (await letters.replay("feedback")).replayed == 1
            (again,) = await wait_for(
                lambda: letters.list("feedback"), lambda held: len(held) == 1, what="again"
            )
            assert (again.replay_count, again.reason) == (round_no, "schema_violation")
        # Three replays: a fourth needs --force.
        skipped = await letters.replay("feedback")
        assert (skipped.replayed, skipped.skipped) == (0, 1)
        assert (await letters.replay("feedback", force=True)).replayed == 1


async def test_purge_by_reason_leaves_the_others_and_purge_all_seeks(
    pubsub_settings: Settings, pubsub: PubSub, letters: DeadLetters
) -> None:
    bad = [message(b"{not json")] * 2 + [message(feedback_payload(rating=9))] * 3
    async with running_worker(pubsub_settings, topics=("feedback",)):
        await publish(pubsub, "feedback", bad)
        await dead_lettered(letters, "feedback", 5)

    assert await letters.purge("feedback", Selection(reason="invalid_json")) == 2
    assert [s.by_reason for s in await letters.stats(["feedback"])] == [{"schema_violation": 3}]
    assert await letters.purge("feedback") is None
    assert await pull_all(pubsub, dead_letter_subscription("feedback"), quiet_s=2) == []


async def test_a_file_naming_an_unknown_dead_letter_is_refused(
    pubsub_settings: Settings, pubsub: PubSub, letters: DeadLetters, tmp_path: Path
) -> None:
    async with running_worker(pubsub_settings, topics=("feedback",)):
        await publish(pubsub, "feedback", [message(b"{not json")])
        await dead_lettered(letters, "feedback", 1)
    path = tmp_path / "edited.jsonl"
    with path.open("w") as out:
        await letters.export("feedback", out)
    stranger = {"data": _encoded("{}"), "source_message_id": "no-such-message"}
    path.write_text(path.read_text() + json.dumps(stranger) + "\n")

    try:
        await letters.replay("feedback", from_file=path)
    except DeadLetterCommandError as refused:
        assert "no-such-message" in str(refused) and "nothing replayed" in str(refused)
    else:
        raise AssertionError("a file with an unknown dead letter was replayed")
    assert len(await letters.list("feedback")) == 1  # untouched


def _decoded(data: str) -> str:
    return base64.b64decode(data).decode()


def _encoded(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def test_a_replay_by_reason_publishes_each_match_once_and_leaves_the_rest(
    pubsub: PubSub, letters: DeadLetters
) -> None:
    # More letters than the pulls may run ahead of the publishes (the emulator returns
    # 100 a pull): the replay streams them, pulling while it publishes.
    count = 2_400
    dead = [
        message(
            feedback_payload(user_id=f"user-{n}"),
            dead_letter_reason="conflict" if n % 2 else "schema_violation",
            dead_letter_detail="stand-in",
            source_topic="feedback",
            source_subscription="feedback-worker",
            source_message_id=str(n),
        )
        for n in range(count)
    ]
    await publish(pubsub, dead_letter_topic("feedback"), dead)

    summary = await letters.replay("feedback", Selection(reason="conflict"))

    assert (summary.replayed, summary.skipped, summary.failed) == (count // 2, 0, 0)
    assert [s.by_reason for s in await letters.stats(["feedback"])] == [
        {"schema_violation": count // 2}
    ]
    replayed = await pull_all(pubsub, "feedback-worker", expected=count // 2)
    users = sorted(int(json.loads(m.data)["user_id"].removeprefix("user-")) for m in replayed)
    assert users == list(range(1, count, 2))  # each match once, nothing else
    assert {m.attributes["replay_count"] for m in replayed} == {"1"}
