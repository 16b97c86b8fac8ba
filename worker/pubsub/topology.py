"""The Pub/Sub topology of CONTRACT.md: one source of truth.

``utxoiq-worker topology apply`` creates it (idempotently) on the emulator or a real
project; ``utxoiq-worker topology render`` prints it as JSON, which is what
``deploy/pubsub-topology.json`` holds (a test keeps the two equal).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from google.api_core import exceptions as api_exceptions
from google.auth.credentials import AnonymousCredentials
from google.protobuf import duration_pb2, field_mask_pb2
from google.pubsub_v1 import PublisherAsyncClient, SubscriberAsyncClient
from google.pubsub_v1.types import DeadLetterPolicy, PushConfig, RetryPolicy, Subscription

from worker.config import Settings
from worker.pubsub.client import subscription_path, topic_path
from worker.topics import Registry

log = logging.getLogger(__name__)

MAX_DELIVERY_ATTEMPTS = 5
ACK_DEADLINE_S = 60
MIN_RETRY_BACKOFF_S = 10
MAX_RETRY_BACKOFF_S = 600
# Dead letters are kept for operators for the longest retention Pub/Sub allows.
DEAD_LETTER_RETENTION_S = 7 * 24 * 3600


@dataclass(frozen=True)
class Redelivery:
    """When a worker subscription hands a message out again: CONTRACT.md's values.

    Only tests pass other ones: after a worker is killed, what it held comes back when
    its ack deadline expires, and a nacked message after the retry backoff; the
    contract's 60 s and 10-600 s would make every fault scenario wait minutes.
    """

    ack_deadline_s: int = ACK_DEADLINE_S
    min_retry_backoff_s: int = MIN_RETRY_BACKOFF_S
    max_retry_backoff_s: int = MAX_RETRY_BACKOFF_S
    max_delivery_attempts: int = MAX_DELIVERY_ATTEMPTS

    def __post_init__(self) -> None:
        # Pub/Sub's own bounds: a value outside them is refused by the API anyway.
        if not 10 <= self.ack_deadline_s <= 600:
            raise ValueError(f"ack_deadline_s must be 10..600, got {self.ack_deadline_s}")
        if not 0 <= self.min_retry_backoff_s <= self.max_retry_backoff_s <= 600:
            raise ValueError("retry backoff must satisfy 0 <= min <= max <= 600 s")
        if not 5 <= self.max_delivery_attempts <= 100:
            raise ValueError(
                f"max_delivery_attempts must be 5..100, got {self.max_delivery_attempts}"
            )


CONTRACT_REDELIVERY = Redelivery()


def render(
    registry: Registry,
    push_endpoint: str | None = None,
    redelivery: Redelivery = CONTRACT_REDELIVERY,
) -> dict[str, Any]:
    """The topology of ``registry``'s topics as plain data (what ``deploy/`` describes)."""
    subscriptions = []
    for spec in registry:
        entry: dict[str, Any] = {
            "name": spec.subscription,
            "topic": spec.name,
            "ack_deadline_seconds": redelivery.ack_deadline_s,
            "retry_policy": {
                "minimum_backoff": f"{redelivery.min_retry_backoff_s}s",
                "maximum_backoff": f"{redelivery.max_retry_backoff_s}s",
            },
            "dead_letter_policy": {
                "dead_letter_topic": spec.dead_letter_topic,
                "max_delivery_attempts": redelivery.max_delivery_attempts,
            },
        }
        if push_endpoint:
            entry["push_config"] = {
                "push_endpoint": f"{push_endpoint.rstrip('/')}/push/{spec.name}"
            }
        subscriptions.append(entry)
        subscriptions.append(
            {
                "name": spec.dead_letter_subscription,
                "topic": spec.dead_letter_topic,
                "ack_deadline_seconds": ACK_DEADLINE_S,
                "message_retention_duration": f"{DEAD_LETTER_RETENTION_S}s",
            }
        )
    topics = [name for spec in registry for name in (spec.name, spec.dead_letter_topic)]
    return {"topics": topics, "subscriptions": subscriptions}


def render_json(registry: Registry, push_endpoint: str | None = None) -> str:
    return json.dumps(render(registry, push_endpoint), indent=2) + "\n"


def _clients(settings: Settings) -> tuple[PublisherAsyncClient, SubscriberAsyncClient]:
    anonymous = AnonymousCredentials()  # type: ignore[no-untyped-call]
    credentials = anonymous if settings.pubsub_emulator_host else None
    return (
        PublisherAsyncClient(credentials=credentials),
        SubscriberAsyncClient(credentials=credentials),
    )


def _subscription(
    project: str, entry: dict[str, Any], push_service_account: str | None, audience: str | None
) -> Subscription:
    subscription = Subscription(
        name=subscription_path(project, entry["name"]),
        topic=topic_path(project, entry["topic"]),
        ack_deadline_seconds=entry["ack_deadline_seconds"],
    )
    if "retry_policy" in entry:
        retry = entry["retry_policy"]
        subscription.retry_policy = RetryPolicy(
            minimum_backoff=duration_pb2.Duration(seconds=_seconds(retry["minimum_backoff"])),
            maximum_backoff=duration_pb2.Duration(seconds=_seconds(retry["maximum_backoff"])),
        )
    if "dead_letter_policy" in entry:
        dead_letter = entry["dead_letter_policy"]
        subscription.dead_letter_policy = DeadLetterPolicy(
            dead_letter_topic=topic_path(project, dead_letter["dead_letter_topic"]),
            max_delivery_attempts=dead_letter["max_delivery_attempts"],
        )
    if "message_retention_duration" in entry:
        subscription.message_retention_duration = duration_pb2.Duration(
            seconds=DEAD_LETTER_RETENTION_S
        )
    if "push_config" in entry:
        push = PushConfig(push_endpoint=entry["push_config"]["push_endpoint"])
        if push_service_account:
            push.oidc_token = PushConfig.OidcToken(
                service_account_email=push_service_account, audience=audience or ""
            )
        subscription.push_config = push
    return subscription


def _seconds(duration: str) -> int:
    """``"10s"`` (render's duration text) as seconds."""
    return int(duration.removesuffix("s"))


_OPTIONAL_FIELDS = ("retry_policy", "dead_letter_policy", "message_retention_duration")


async def apply(
    settings: Settings,
    registry: Registry,
    push_endpoint: str | None = None,
    redelivery: Redelivery = CONTRACT_REDELIVERY,
) -> dict[str, int]:
    """Create or bring up to date every topic and subscription; counts of what changed.

    ``redelivery`` is CONTRACT.md's unless a test shortens it (see ``Redelivery``).
    """
    publisher, subscriber = _clients(settings)
    project = settings.google_cloud_project
    plan = render(registry, push_endpoint, redelivery)
    counts = {"topics_created": 0, "subscriptions_created": 0, "subscriptions_updated": 0}
    account = settings.push_service_accounts[0] if settings.push_service_accounts else None
    for name in plan["topics"]:
        try:
            await publisher.create_topic(name=topic_path(project, name))
            counts["topics_created"] += 1
        except api_exceptions.AlreadyExists:
            pass
    for entry in plan["subscriptions"]:
        wanted = _subscription(project, entry, account, settings.push_audience)
        try:
            await subscriber.create_subscription(request=wanted)
            counts["subscriptions_created"] += 1
        except api_exceptions.AlreadyExists:
            # An empty push_config turns a push subscription back into a pull one.
            paths = ["ack_deadline_seconds", "push_config"]
            paths += [p for p in _OPTIONAL_FIELDS if p in entry]
            await subscriber.update_subscription(
                subscription=wanted, update_mask=field_mask_pb2.FieldMask(paths=paths)
            )
            counts["subscriptions_updated"] += 1
    log.info("topology applied", extra={"project": project, **counts})
    return counts


async def delete(settings: Settings, registry: Registry) -> None:
    """Delete every subscription and topic of the topology in ``settings``' project.

    For throwaway projects (tests, benchmarks on the emulator): an emulator keeps
    every message of every subscription in memory until the subscription is deleted.
    """
    publisher, subscriber = _clients(settings)
    project = settings.google_cloud_project
    plan = render(registry)
    for entry in plan["subscriptions"]:
        with contextlib.suppress(api_exceptions.NotFound):
            await subscriber.delete_subscription(
                subscription=subscription_path(project, entry["name"])
            )
    for name in plan["topics"]:
        with contextlib.suppress(api_exceptions.NotFound):
            await publisher.delete_topic(topic=topic_path(project, name))
