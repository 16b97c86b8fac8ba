"""The pipeline's decisions, with a fake handler and settler (no emulator, no database):
what is committed and acked, what is dead-lettered (and only then acked), what is
nacked, when the batch is halved, and when the source backs off."""

from __future__ import annotations

import time

from tests.support.fakes import DeadLetters, Fussy, PipelineRun, TransientError, counter, payloads


async def test_a_refused_batch_is_halved_until_the_culprit_is_alone() -> None:
    run = PipelineRun(Fussy())
    ids = [f"m{i}" for i in range(15)]
    await run.settle(payloads(*ids[:7], "apply-refuse", *ids[7:]))

    assert run.dead.published == [("apply-refuse", "schema_violation")]
    assert sorted(run.settled.acked) == sorted([*ids, "apply-refuse"])
    assert run.settled.nacked == []
    assert sorted(run.handler.applied) == sorted(i.encode() for i in ids)
    # Halving touched only the halves holding the culprit: about 2 log2(16) calls.
    assert run.handler.calls <= 2 * 4 + 1


async def test_a_transient_failure_nacks_the_batch_and_backs_off() -> None:
    run = PipelineRun(Fussy(transient_failures=1))
    await run.settle(payloads("a", "b", "c"))

    assert sorted(run.settled.nacked) == ["a", "b", "c"]
    assert run.settled.acked == [] and run.dead.published == []
    # The sources pause before pulling again (the fake's first pause is 50 ms).
    started = time.monotonic()
    await run.pipeline.backoff.wait()
    assert time.monotonic() - started >= 0.02
    assert counter(run.reader, "worker.messages.nacked") == {"feedback": 3}


async def test_a_dead_letter_that_cannot_be_published_is_nacked_not_acked() -> None:
    run = PipelineRun(Fussy(), DeadLetters(failing=True))
    messages = payloads("good")
    messages["bad"] = b'{"parse": "refuse"}'
    await run.settle(messages)

    assert run.settled.acked == ["good"]
    assert run.settled.nacked == ["bad"]  # Pub/Sub redelivers it; nothing is lost


async def test_invalidations_go_out_after_the_commit_and_before_the_ack() -> None:
    published: list[tuple[str, frozenset[str]]] = []
    run: PipelineRun

    async def invalidate(topic: str, keys: frozenset[str]) -> None:
        assert run.settled.acked == []  # not acked before the invalidations went out
        published.append((topic, keys))

    run = PipelineRun(Fussy(), after_commit=invalidate)
    await run.settle(payloads("a", "b"))

    assert published == [("feedback", frozenset({"key:a", "key:b"}))]
    assert sorted(run.settled.acked) == ["a", "b"]


async def test_invalidations_that_cannot_go_out_nack_the_committed_batch() -> None:
    async def unreachable(topic: str, keys: frozenset[str]) -> None:
        raise TransientError("cache-invalidation unavailable")

    run = PipelineRun(Fussy(), after_commit=unreachable)
    await run.settle(payloads("a", "b"))

    # Committed but not acked: the redelivery rewrites (a no-op) and invalidates then.
    assert sorted(run.handler.applied) == [b"a", b"b"]
    assert sorted(run.settled.nacked) == ["a", "b"]
