"""The app's own OpenAPI document, fuzzed with schemathesis: no request gets a 5xx.

Every operation of ``/openapi.json`` is driven with up to 30 generated requests, valid
and invalid ones, against the real app on the real stack (PostgreSQL, Redis, the
emulator all up, so a 5xx can only be a bug). The app is served by uvicorn in a
thread of this process: schemathesis calls are blocking, the app needs a loop.

``POST /push/{topic}`` documents no body (it reads the raw request), so the test adds
the push envelope to its copy of the document, and injects push auth as disabled.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import hypothesis
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core.result import Ok

from tests.support.push import served
from tests.support.topics import REGISTRY
from worker.config import Settings
from worker.http.app import create_app
from worker.http.services import Services

MAX_EXAMPLES = 30

ENVELOPE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["message", "subscription"],
    "properties": {
        "message": {
            "type": "object",
            "required": ["messageId"],
            "properties": {
                "data": {"type": "string", "format": "byte"},
                "messageId": {"type": "string"},
                "message_id": {"type": "string"},
                "attributes": {"type": "object", "additionalProperties": {"type": "string"}},
                "publishTime": {"type": "string", "format": "date-time"},
                "orderingKey": {"type": "string"},
            },
        },
        "subscription": {"type": "string"},
        "deliveryAttempt": {"type": "integer"},
    },
}


def documented_schema() -> dict[str, Any]:
    """The app's OpenAPI document, with the push envelope and the real topics added."""
    document = copy.deepcopy(
        create_app(lambda: Services.create(Settings(), REGISTRY), None).openapi()
    )
    push = document["paths"]["/push/{topic}"]["post"]
    push["requestBody"] = {
        "required": True,
        "content": {"application/json": {"schema": ENVELOPE_SCHEMA}},
    }
    for parameter in push["parameters"]:
        if parameter["name"] == "topic":
            parameter["schema"] = {"type": "string", "enum": list(REGISTRY.names())}
    return document


def operations() -> dict[str, Any]:
    found: dict[str, Any] = {}
    for result in schemathesis.openapi.from_dict(documented_schema()).get_all_operations():
        assert isinstance(result, Ok), f"an operation schemathesis cannot use: {result!r}"
        found[result.ok().label] = result.ok()
    return found


OPERATIONS = operations()


@contextmanager
def served_app(settings: Settings) -> Iterator[str]:
    """The app (push auth off) served as ``serve`` serves it; its URL."""
    with served(create_app(lambda: Services.create(settings, REGISTRY), None)) as port:
        yield f"http://127.0.0.1:{port}"


def cases(label: str) -> st.SearchStrategy[Any]:
    operation = OPERATIONS[label]
    return st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    )


def test_every_operation_is_fuzzed() -> None:
    assert set(OPERATIONS) >= {
        "POST /push/{topic}",
        "GET /healthz",
        "GET /readyz",
        "GET /v1/feedback/{insight_id}/stats",
        "GET /v1/backfill-jobs/{job_id}",
        "GET /v1/backfill-jobs",
        "GET /v1/metrics",
    }


@pytest.mark.slow
@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_no_request_gets_a_server_error(label: str, pubsub_settings: Settings) -> None:
    seen: list[int] = []
    with served_app(pubsub_settings) as base_url:

        @hypothesis.settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
            phases=[hypothesis.Phase.generate],
        )
        @hypothesis.given(case=cases(label))
        def request(case: Any) -> None:
            response = case.call(base_url=base_url, timeout=30)
            seen.append(response.status_code)
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path} -> {response.status_code}: "
                f"{response.text[:500]}\n{case.as_curl_command()}"
            )

        request()
    assert seen, "no request was made"
    if label.startswith("POST /push"):
        # Some generated envelopes went through the pipeline (committed or dead-lettered).
        assert 204 in seen, seen
