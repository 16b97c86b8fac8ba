"""Hypothesis strategies for hostile messages: what any publisher may send.

Payloads start from a valid one of each topic and are bent: fields replaced by
hostile values (deep nesting, NUL and other control characters, lone surrogates,
huge and non-finite numbers, timestamps at and past the ends of time, in any
offset), fields added or removed, or the whole data replaced by arbitrary bytes.
Most of what comes out must be dead-lettered; some of it is valid and applies.
"""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import strategies as st

from tests.support.factories import backfill_payload, feedback_payload, metric_payload

REASONS = frozenset(
    {"invalid_json", "invalid_encoding", "schema_violation", "conflict", "too_large", "expired"}
)
"""CONTRACT.md's dead-letter reasons."""

EDGE_TIMES = [
    "0001-01-01T00:00:00+14:00",
    "0001-01-01T00:00:00Z",
    "0001-01-02T00:00:00Z",
    "1900-01-01T00:00:00Z",
    "1970-01-01T00:00:00Z",
    "9999-12-31T23:59:59-14:00",
    "9999-12-31T23:59:59.999999Z",
    "9999-12-30T00:00:00Z",
    "2026-02-30T10:00:00Z",
    "2026-11-21T24:00:00Z",
    "2026-11-21T10:00:00+24:00",
    "2026-11-21T10:00:00.1234567891Z",
    "10000-01-01T00:00:00Z",
]

_offsets = st.integers(-14 * 60, 14 * 60).map(lambda m: timedelta(minutes=m))

times = st.one_of(
    st.sampled_from(EDGE_TIMES),
    st.builds(
        lambda moment, offset: (
            moment.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z")
            if offset == timedelta(0)
            else moment.isoformat() + _offset_text(offset)
        ),
        st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)),
        _offsets,
    ),
    # Near now: inside and outside each retention window, and the 24 h future limit.
    st.builds(
        lambda days: (datetime.now(UTC) + timedelta(days=days)).isoformat(),
        st.floats(-1000, 3, allow_nan=False),
    ),
)


def _offset_text(offset: timedelta) -> str:
    minutes = int(offset.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    return f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


texts = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=st.characters(codec=None, categories=["Cc", "Cs", "Co", "Cn"]), max_size=10),
    st.sampled_from(["\x00", "a\x00b", "\ud800", "\udfff", "\u202e", "😀" * 101, "x" * 5001]),
)

numbers = st.one_of(
    st.integers(),
    st.sampled_from([2**31, -(2**31) - 1, 2**63, -(2**63) - 1, 2**64, 10**30, 10**400]),
    st.floats(),  # NaN and Infinity become invalid JSON tokens
)

leaves = st.one_of(st.none(), st.booleans(), numbers, texts, times)
json_values = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(texts, children, max_size=4),
    ),
    max_leaves=12,
)


@st.composite
def deeply_nested(draw: st.DrawFn) -> bytes:
    """JSON text of a leaf (often a NUL) under hundreds or thousands of lists and
    objects: deeper than Python's recursion limit, within or past orjson's (1024)."""
    text = draw(st.sampled_from([b'"\\u0000"', b'"ok"', b"1", b"null"]))
    depth = draw(st.integers(100, 1500))
    # One draw for the shape (a bit a level): a draw per level is slow to shrink.
    shape = int.from_bytes(draw(st.binary(min_size=depth // 8 + 1, max_size=depth // 8 + 1)))
    for level in range(depth):
        text = b"[" + text + b"]" if shape >> level & 1 else b'{"k":' + text + b"}"
    return text


hostile_values = st.one_of(leaves, json_values)

BASES = {
    "backfill-progress": lambda: backfill_payload(job_id=str(uuid.uuid4())),
    "feedback": lambda: feedback_payload(insight_id=f"fuzz-{uuid.uuid4()}"),
    "metrics": lambda: metric_payload(event_id=str(uuid.uuid4())),
}


@st.composite
def payloads(draw: st.DrawFn, topic: str) -> Any:
    """A decoded payload of ``topic``, bent."""
    payload: dict[str, Any] = BASES[topic]()
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["replace", "drop", "add"]))
        field = draw(st.sampled_from(sorted(payload))) if payload else "x"
        if action == "replace":
            payload[field] = draw(hostile_values)
        elif action == "drop":
            payload.pop(field, None)
        else:
            payload[draw(texts)] = draw(hostile_values)
    if topic == "metrics" and draw(st.booleans()):
        return {"metrics": [payload, *draw(st.lists(st.just(BASES[topic]()), max_size=2))]}
    return payload


def _dumps(value: Any, ascii_only: bool) -> bytes:
    """JSON text as a careless publisher writes it: NaN as is, and lone surrogates
    either escaped or written raw (which is not UTF-8)."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def message_data(draw: st.DrawFn, topic: str) -> bytes:
    """A message's data: a bent payload as JSON text, mangled bytes, or any bytes."""
    kind = draw(st.sampled_from(["payload", "payload", "payload", "mangled", "deep", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "deep":
        payload = BASES[topic]()
        field = draw(st.sampled_from(sorted(payload)))
        rest = json.dumps({k: v for k, v in payload.items() if k != field}).encode()
        return b'{"' + field.encode() + b'": ' + draw(deeply_nested()) + b", " + rest[1:]
    data = _dumps(draw(payloads(topic)), draw(st.booleans()))
    if kind == "mangled":
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] + draw(st.binary(max_size=4)) + data[cut + 1 :]
    return data


def envelope_fields() -> st.SearchStrategy[dict[str, Any]]:
    """Push envelope ``message`` fields, any of them hostile."""
    return st.fixed_dictionaries(
        {},
        optional={
            "messageId": st.one_of(texts, numbers, st.none()),
            "publishTime": st.one_of(times, texts, numbers),
            "attributes": st.one_of(
                st.dictionaries(texts, texts, max_size=3), json_values, st.none()
            ),
            "data": st.one_of(texts, numbers, st.none(), st.binary(max_size=30).map(_b64)),
        },
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def valid_neighbours(topic: str, count: int) -> list[bytes]:
    """``count`` valid messages of ``topic``, each with an identity of its own."""
    return [json.dumps(BASES[topic]()).encode() for _ in range(count)]
