"""A batch span's links to the traces its messages were published in.

A publisher that traces puts W3C trace context in the message's attributes:
``traceparent`` (and ``tracestate``) when it injects it itself, ``googclient_traceparent``
when the Pub/Sub client library's own OpenTelemetry tracing does. A batch applies many
messages, so its span cannot have one parent: it links to each distinct context, up to
``MAX_LINKS`` (the SDK's default limit; more are dropped by it anyway).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from opentelemetry import trace
from opentelemetry.trace import Link
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

MAX_LINKS = 128
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
CLIENT_TRACEPARENT = "googclient_traceparent"

_PROPAGATOR = TraceContextTextMapPropagator()


def links_to_publishers(attributes: Iterable[Mapping[str, str]]) -> list[Link]:
    """One link per distinct valid trace context found in ``attributes``."""
    links: list[Link] = []
    seen: set[tuple[int, int]] = set()
    for attrs in attributes:
        carrier = _carrier(attrs)
        if carrier is None:
            continue
        context = trace.get_current_span(_PROPAGATOR.extract(carrier)).get_span_context()
        key = (context.trace_id, context.span_id)
        if not context.is_valid or key in seen:
            continue
        seen.add(key)
        links.append(Link(context))
        if len(links) == MAX_LINKS:
            break
    return links


def _carrier(attrs: Mapping[str, str]) -> dict[str, str] | None:
    # Most messages carry neither: two dict lookups is all they cost.
    if TRACEPARENT in attrs:
        carrier = {TRACEPARENT: attrs[TRACEPARENT]}
        if TRACESTATE in attrs:
            carrier[TRACESTATE] = attrs[TRACESTATE]
        return carrier
    if CLIENT_TRACEPARENT in attrs:
        return {TRACEPARENT: attrs[CLIENT_TRACEPARENT]}
    return None
