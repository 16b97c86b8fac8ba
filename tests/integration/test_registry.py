"""The topic registry (issue 15): a topic declared once is consumed by pull and push
alike; every write path invalidates the cache; ``maintenance`` is consumed, not left
unread.

The throwaway topic below is declared in this file only: the topology, the pull
worker, the push routes and dead-lettering come from the registry, with no other
edit anywhere.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from handlers.events import validate
from schemas.common import Payload, StorableText
from tests.support.cache import own_redis_db
from tests.support.emulator import (
    drain_dead_letters,
    publish,
    running_worker,
    wait_for,
    wait_for_count,
)
from tests.support.factories import feedback
from tests.support.push import app_client, encoded, envelope
from tests.support.topics import REGISTRY
from worker.config import Settings
from worker.http.services import Services
from worker.pipeline.handler import BatchOutcome
from worker.pubsub import topology
from worker.pubsub.client import PubSub
from worker.storage.database import driver_connection, transaction
from worker.topics import Topic


class Note(Payload):
    note_id: uuid.UUID
    text: StorableText


class NotesHandler:
    """A topic of its own: notes stored once per id (what a new module would hold)."""

    topic = "scratch-notes"

    def parse(self, payload: dict[str, Any], published_at: datetime) -> Note:
        return validate(Note, payload)

    async def apply(self, engine: Any, items: Sequence[Note]) -> BatchOutcome:
        async with transaction(engine) as conn:
            driver = await driver_connection(conn)
            await driver.execute(
                "INSERT INTO scratch_notes (id, text) SELECT * FROM unnest($1::uuid[], $2::text[])"
                " ON CONFLICT (id) DO NOTHING",
                [n.note_id for n in items],
                [n.text for n in items],
            )
        return BatchOutcome()


NOTES = Topic(
    name="scratch-notes",
    subscription="scratch-notes-worker",
    build_handler=lambda context: NotesHandler(),
    invalidates_cache=False,
    pulled_by_default=False,
)
WITH_NOTES = REGISTRY.with_topic(NOTES)
JSON = {"content-type": "application/json"}


async def notes_table(engine: AsyncEngine) -> None:
    """The new topic's migration, as far as this test needs one."""
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE scratch_notes (id uuid PRIMARY KEY, text text)"))


def note(text_: str) -> dict[str, str]:
    return {"note_id": str(uuid.uuid4()), "text": text_}


async def test_a_topic_declared_once_is_pulled_and_pushed(
    pubsub_settings: Settings, pubsub: PubSub, engine: AsyncEngine
) -> None:
    await notes_table(engine)
    await topology.apply(pubsub_settings, WITH_NOTES)
    count = "SELECT count(*) FROM scratch_notes"

    async with running_worker(pubsub_settings, topics=["scratch-notes"], registry=WITH_NOTES):
        await publish(pubsub, "scratch-notes", [note("pulled"), b"{not json"])
        await wait_for_count(engine, count, 1)
        (letter,) = await drain_dead_letters(pubsub, "scratch-notes", expected=1)
    assert letter.attributes["dead_letter_reason"] == "invalid_json"
    assert letter.attributes["source_subscription"] == "scratch-notes-worker"

    services = Services.create(pubsub_settings, WITH_NOTES)
    async with app_client(pubsub_settings, services) as http:
        answer = await http.post(
            "/push/scratch-notes", content=encoded(envelope(note("pushed"))), headers=JSON
        )
        assert answer.status_code == 204, answer.text
        unknown = await http.post(
            "/push/scratch-unknown", content=encoded(envelope(note("x"))), headers=JSON
        )
        assert unknown.status_code == 404
    async with engine.connect() as conn:
        stored = (await conn.execute(text("SELECT text FROM scratch_notes ORDER BY 1"))).scalars()
        assert list(stored) == ["pulled", "pushed"]


async def test_the_service_api_invalidates_what_it_writes(
    pubsub_settings: Settings, pubsub: PubSub
) -> None:
    """A write through ``DatabaseService`` reaches the cached stats (once cached at
    average 1.0, they stayed so for an hour before)."""
    async with own_redis_db(pubsub_settings) as rdb:
        services = Services.create(rdb.settings, REGISTRY)
        insight = f"insight-{uuid.uuid4().hex[:8]}"
        try:
            async with running_worker(rdb.settings, topics=["cache-invalidation"]):
                await services.db.create_feedback(
                    feedback(insight, "u1", occurred_at=_now(), rating=1)
                )
                assert (await services.reads.get_feedback_stats(insight)).average_rating == 1.0
                await services.db.create_feedback(
                    feedback(insight, "u2", occurred_at=_now(), rating=5)
                )

                async def average() -> float:
                    return (await services.reads.get_feedback_stats(insight)).average_rating

                await wait_for(average, lambda a: a == 3.0, timeout_s=10, what="cached average 3.0")
        finally:
            await services.close()


def _now() -> datetime:
    return datetime.now().astimezone()


async def test_maintenance_requests_are_consumed_not_left_unread(
    pubsub_settings: Settings, pubsub: PubSub
) -> None:
    # A retention dry run is consumed (acked, counted, nothing changed); an unknown task
    # is dead-lettered; backups run (tests/integration/test_maintenance_runs.py).
    requests: list[dict[str, Any]] = [{"task": "retention", "dry_run": True}, {"task": "vacuum"}]
    async with running_worker(pubsub_settings, topics=["maintenance"]):
        await publish(pubsub, "maintenance", requests)
        letters = await drain_dead_letters(pubsub, "maintenance", expected=1)
    reasons = {json.loads(m.data)["task"]: m.attributes["dead_letter_reason"] for m in letters}
    assert reasons == {"vacuum": "schema_violation"}
    services = Services.create(pubsub_settings, REGISTRY)
    async with app_client(pubsub_settings, services) as http:
        pushed = await http.post(
            "/push/maintenance",
            content=encoded(envelope({"task": "retention", "dry_run": True})),
            headers=JSON,
        )
        assert pushed.status_code == 204  # rehearsed and acked, not a 404 left to retries
