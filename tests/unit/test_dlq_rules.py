"""Dead letters without a server: reasons, replay attributes, filters, the replay file."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from worker.dlq.letters import DeadLetter, Selection, replay_attributes
from worker.dlq.replay_file import read_entries
from worker.exceptions import DeadLetterCommandError

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
WORKER_ATTRIBUTES = {
    "trace": "abc",
    "dead_letter_reason": "schema_violation",
    "dead_letter_detail": "rating: must be 1..5",
    "source_topic": "feedback",
    "source_subscription": "feedback-worker",
    "source_message_id": "111",
    "source_publish_time": "2026-11-27T11:00:00Z",
    "failed_at": "2026-11-27T11:00:01Z",
}
FORWARDED_ATTRIBUTES = {
    "trace": "abc",
    "CloudPubSubDeadLetterSourceDeliveryCount": "5",
    "CloudPubSubDeadLetterSourceSubscription": "feedback-worker",
    "CloudPubSubDeadLetterSourceSubscriptionProject": "p",
    "CloudPubSubDeadLetterSourceTopicPublishTime": "2026-11-27T11:00:00Z",
}


def letter(
    attributes: dict[str, str], data: bytes = b'{"rating": 9}', age_s: int = 60
) -> DeadLetter:
    return DeadLetter("ack", "222", data, attributes, NOW - timedelta(seconds=age_s))


def test_the_workers_reason_or_pubsubs_forwarding_names_the_failure() -> None:
    mine = letter(WORKER_ATTRIBUTES)
    assert (mine.reason, mine.detail, mine.source_message_id) == (
        "schema_violation",
        "rating: must be 1..5",
        "111",
    )
    forwarded = letter(FORWARDED_ATTRIBUTES)
    assert forwarded.reason == "delivery_attempts_exceeded"
    assert forwarded.detail == "5 delivery attempts on feedback-worker"
    assert forwarded.source_message_id == "222"  # no source attribute: its own id
    assert letter({}).reason == "unknown"


@pytest.mark.parametrize("attributes", [WORKER_ATTRIBUTES, FORWARDED_ATTRIBUTES])
def test_a_replay_keeps_the_original_attributes_and_counts_itself(
    attributes: dict[str, str],
) -> None:
    first = replay_attributes(attributes, letter(attributes).replay_count, NOW)
    assert first == {"trace": "abc", "replayed_at": "2026-11-27T12:00:00Z", "replay_count": "1"}
    again = letter({**attributes, **first})
    assert again.replay_count == 1
    assert replay_attributes(again.attributes, again.replay_count, NOW)["replay_count"] == "2"
    assert letter({"replay_count": "junk"}).replay_count == 0


def test_a_preview_is_printable_and_short() -> None:
    assert letter({}, b"\xff\x00abc").preview() == "\ufffd\\u0000abc"
    long = letter({}, b"x" * 500).preview(20)
    assert len(long) == 20 and long.endswith("…")


def test_every_filter_given_must_hold() -> None:
    old = letter(WORKER_ATTRIBUTES, age_s=7200)
    assert Selection().matches(old) and Selection().everything
    assert Selection(reason="schema_violation").matches(old)
    assert not Selection(reason="conflict").matches(old)
    assert not Selection(since=NOW - timedelta(hours=1)).matches(old)
    assert Selection(before=NOW - timedelta(hours=1)).matches(old)
    assert Selection(message_ids=frozenset({"111"})).matches(old)  # by source id too
    assert not Selection(message_ids=frozenset({"333"}), reason="schema_violation").matches(old)


def test_an_exported_line_reads_back_as_its_replacement(tmp_path: Path) -> None:
    exported = letter(WORKER_ATTRIBUTES).exported()
    path = tmp_path / "dead.jsonl"
    path.write_text(json.dumps(exported) + "\n\n")
    (entry,) = read_entries(path)
    assert (entry.source_message_id, entry.data, entry.attributes) == (
        "111",
        b'{"rating": 9}',
        WORKER_ATTRIBUTES,
    )


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ("not json", "dead.jsonl:2"),
        ('["a list"]', "not a JSON object"),
        ('{"data": "***", "source_message_id": "1"}', "not base64"),
        ('{"data": 5, "source_message_id": "1"}', "data must be a base64 string"),
        ('{"data": "", "attributes": {"a": 1}, "message_id": "1"}', "object of strings"),
        ('{"data": ""}', "no source_message_id"),
    ],
)
def test_a_bad_line_refuses_the_whole_file(tmp_path: Path, line: str, complaint: str) -> None:
    good = json.dumps({"data": base64.b64encode(b"{}").decode(), "source_message_id": "9"})
    path = tmp_path / "dead.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(DeadLetterCommandError, match="nothing replayed") as refused:
        read_entries(path)
    assert complaint in str(refused.value)


def test_two_lines_for_one_dead_letter_are_refused(tmp_path: Path) -> None:
    line = json.dumps({"data": "", "source_message_id": "9"})
    path = tmp_path / "dead.jsonl"
    path.write_text(f"{line}\n{line}\n")
    with pytest.raises(DeadLetterCommandError, match="two lines replace dead letter 9"):
        read_entries(path)
