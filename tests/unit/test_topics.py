"""The topic registry: what handlers declare is what the topology and ``run`` get."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from handlers import registry
from worker.pubsub import topology
from worker.topics import Registry, Topic

DEPLOYED = Path(__file__).resolve().parents[2] / "deploy" / "pubsub-topology.json"


def test_every_contract_topic_is_declared_once() -> None:
    topics = registry()
    assert set(topics.names()) == {
        "backfill-progress",
        "feedback",
        "metrics",
        "cache-invalidation",
        "maintenance",
    }
    assert topics["feedback"].subscription == "feedback-worker"
    assert topics["metrics"].dead_letter_subscription == "metrics-dead-letter-sub"
    # `run` consumes every topic by default, maintenance included (never left unread).
    assert set(topics.pulled_by_default()) == set(topics.names())


def test_the_deployed_topology_is_the_rendered_registry() -> None:
    assert json.loads(DEPLOYED.read_text()) == topology.render(registry())


def test_an_unknown_topic_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown topic 'nope'; known: "):
        registry()["nope"]


def test_two_topics_cannot_share_a_subscription() -> None:
    topic = registry()["feedback"]
    twin = Topic("feedback-copy", topic.subscription, topic.build_handler)
    with pytest.raises(ValueError, match="share a subscription"):
        Registry([topic, twin])
