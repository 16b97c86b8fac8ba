"""Links from a batch span to the traces its messages were published in."""

from __future__ import annotations

from worker.pipeline.trace_links import MAX_LINKS, links_to_publishers

TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"


def traceparent(trace: str = TRACE, span: str = SPAN) -> str:
    return f"00-{trace}-{span}-01"


def ids(attributes: list[dict[str, str]]) -> list[tuple[str, str]]:
    return [
        (f"{link.context.trace_id:032x}", f"{link.context.span_id:016x}")
        for link in links_to_publishers(attributes)
    ]


def test_both_carriers_are_read_and_each_context_linked_once() -> None:
    other = ("1" * 32, "2" * 16)
    found = ids(
        [
            {"traceparent": traceparent()},
            {"traceparent": traceparent(), "origin": "x"},  # the same context again
            {"googclient_traceparent": traceparent(*other)},  # Pub/Sub's client tracing
            {"origin": "untraced"},
        ]
    )
    assert found == [(TRACE, SPAN), other]


def test_a_malformed_or_invalid_context_is_ignored() -> None:
    assert ids([{"traceparent": "not a context"}]) == []
    assert ids([{"traceparent": traceparent("0" * 32)}]) == []  # the all-zero trace id


def test_links_stop_at_the_sdk_s_limit() -> None:
    many = [{"traceparent": traceparent(span=f"{n + 1:016x}")} for n in range(MAX_LINKS + 5)]
    assert len(ids(many)) == MAX_LINKS
