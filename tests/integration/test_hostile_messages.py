"""Hostile messages against the real stack (issue 14): PostgreSQL, the emulator, the
worker's own pipelines, by pull and by push.

A message nested deeper than Python's recursion limit once killed a pull task: its
20 neighbours were never written and their leases extended for ever. Now any input,
fuzzed, is either applied or dead-lettered with a reason (push answers 204), and its
valid neighbours are applied.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.emulator import (
    FAST_BATCH,
    drain_dead_letters,
    publish,
    running_worker,
    scalar,
    wait_for_count,
)
from tests.support.factories import feedback_payload, metric_payload
from tests.support.hostile import REASONS, message_data, valid_neighbours
from tests.support.push import PushServices, app_client
from worker.config import Settings
from worker.pubsub.client import PubSub

TOPICS = ("backfill-progress", "feedback", "metrics")
TABLES = {
    "backfill-progress": "backfill_jobs",
    "feedback": "insight_feedback",
    "metrics": "system_metrics",
}


def deep_nul(depth: int = 1000) -> bytes:
    return b'{"comment": ' + b"[" * depth + b'"\\u0000"' + b"]" * depth + b"}"


async def test_a_deeply_nested_message_does_not_stall_its_pull(
    pubsub_settings: Settings, pubsub: PubSub, engine: AsyncEngine
) -> None:
    good = [feedback_payload(insight_id="deep", user_id=f"u{i}") for i in range(20)]
    # One publish request: the hostile message sits in the same pull as the others.
    await publish(pubsub, "feedback", [*good[:10], deep_nul(), *good[10:]])
    async with running_worker(pubsub_settings, topics=("feedback",)):
        await wait_for_count(engine, "SELECT count(*) FROM insight_feedback", 20)
        (letter,) = await drain_dead_letters(pubsub, "feedback", expected=1)
    assert letter.data == deep_nul()
    assert letter.attributes["dead_letter_reason"] == "schema_violation"
    assert letter.attributes["dead_letter_detail"].endswith("NUL character in text")


@pytest_asyncio.fixture(loop_scope="session")
async def fuzz_push(
    pubsub_settings: Settings,
) -> AsyncIterator[tuple[httpx.AsyncClient, PushServices]]:
    push = PushServices(pubsub_settings, FAST_BATCH)
    async with app_client(pubsub_settings, push.services) as http:
        yield http, push


def push_body(data: bytes, message_id: str, published: str | None = None) -> bytes:
    published = published or datetime.now(UTC).isoformat().replace("+00:00", "Z")
    message = {
        "data": base64.b64encode(data).decode("ascii"),
        "messageId": message_id,
        "publishTime": published,
        "attributes": {"fuzz": "1"},
    }
    return json.dumps({"message": message, "subscription": "projects/p/subscriptions/s"}).encode()


@given(data=st.data())
@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
async def test_fuzzed_pushes_are_applied_or_dead_lettered_and_neighbours_apply(
    fuzz_push: tuple[httpx.AsyncClient, PushServices],
    engine: AsyncEngine,
    data: st.DataObject,
) -> None:
    http, push = fuzz_push
    topic = data.draw(st.sampled_from(TOPICS), label="topic")
    hostile = data.draw(st.lists(message_data(topic), min_size=1, max_size=6), label="hostile")
    neighbours = valid_neighbours(topic, 3)
    before = await scalar(engine, f"SELECT count(*) FROM {TABLES[topic]}")
    settled_before = settled(push, topic)
    sent = [*hostile, *neighbours]
    # Concurrent: they meet in the same micro-batches.
    answers = await asyncio.gather(
        *(
            http.post(
                f"/push/{topic}",
                content=push_body(m, str(uuid.uuid4().int % 10**16)),
                headers={"content-type": "application/json"},
            )
            for m in sent
        )
    )
    assert [a.status_code for a in answers] == [204] * len(sent), [a.text for a in answers]
    after = await scalar(engine, f"SELECT count(*) FROM {TABLES[topic]}")
    assert after >= before + len(neighbours)  # every neighbour has a row of its own
    assert push.counter("nacked", topic) == 0
    # Each one either committed or dead-lettered (with a reason: checked below).
    assert settled(push, topic) - settled_before == len(sent)


def settled(push: PushServices, topic: str) -> int:
    return push.counter("committed", topic) + push.counter("dead_lettered", topic)


async def test_the_fuzzed_dead_letters_carry_contract_reasons(
    fuzz_push: tuple[httpx.AsyncClient, PushServices], pubsub: PubSub
) -> None:
    http, push = fuzz_push
    for topic, data in [
        ("feedback", deep_nul()),
        ("metrics", b'{"metrics": [' + b"[" * 2000 + b"]" * 2000 + b"]}"),
        ("backfill-progress", b'{"occurred_at": "0001-01-01T00:00:00+14:00"}'),
    ]:
        answer = await http.post(
            f"/push/{topic}",
            content=push_body(data, "1"),
            headers={"content-type": "application/json"},
        )
        assert answer.status_code == 204, answer.text
    for topic in TOPICS:
        letters = await drain_dead_letters(pubsub, topic, expected=1)
        assert {m.attributes["dead_letter_reason"] for m in letters} <= REASONS
        assert len(letters) == push.counter("dead_lettered", topic)


async def test_extreme_publish_times_are_refused_alone(
    fuzz_push: tuple[httpx.AsyncClient, PushServices], pubsub: PubSub, engine: AsyncEngine
) -> None:
    """A sample without a timestamp takes its publish time: one UTC cannot hold is a
    schema violation, a century-old one is expired (no partition for 1900), and the
    sample pushed beside them in the same micro-batch is stored."""
    http, _push = fuzz_push
    sample = metric_payload(event_id=None)
    del sample["event_id"], sample["timestamp"]
    times = {
        "year-1": "0001-01-01T00:00:00+14:00",
        "year-10000": "9999-12-31T23:59:59-14:00",
        "year-1900": "1900-01-01T00:00:00Z",
        "now": None,
    }
    answers = await asyncio.gather(
        *(
            http.post(
                "/push/metrics",
                content=push_body(json.dumps(sample).encode(), case, published),
                headers={"content-type": "application/json"},
            )
            for case, published in times.items()
        )
    )
    assert [a.status_code for a in answers] == [204] * 4, [a.text for a in answers]
    letters = await drain_dead_letters(pubsub, "metrics", expected=3)
    reasons = {
        m.attributes["source_message_id"]: m.attributes["dead_letter_reason"] for m in letters
    }
    assert reasons == {
        "year-1": "schema_violation",
        "year-10000": "schema_violation",
        "year-1900": "expired",
    }
    assert await scalar(engine, "SELECT count(*) FROM system_metrics") == 1
    partitions = await scalar(
        engine, "SELECT count(*) FROM pg_class WHERE relname LIKE 'system_metrics_y1900%'"
    )
    assert partitions == 0
