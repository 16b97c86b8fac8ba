"""``worker.pipeline.crash_points``: parsed once, a no-op when unset, a kill on the armed hit."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from worker.pipeline.crash_points import ENV_VAR, CrashPoint, CrashPoints


class Killed(Exception):
    """Stands in for SIGKILL: the test sees where the process would have died."""


def armed(text: str, calls: list[int]) -> CrashPoints:
    """``text`` parsed as ``WORKER_CRASH_AT``; the kill records and raises instead."""

    def kill() -> None:
        calls.append(1)
        raise Killed

    parsed = CrashPoints.parse(text)
    return CrashPoints(parsed.point, parsed.on_hit, kill=kill)


@pytest.mark.parametrize(
    ("text", "point", "on_hit"),
    [
        ("", None, 1),
        ("   ", None, 1),
        ("before_commit", CrashPoint.BEFORE_COMMIT, 1),
        ("after_commit", CrashPoint.AFTER_COMMIT, 1),
        ("after_publish", CrashPoint.AFTER_PUBLISH, 1),
        ("after_commit:3", CrashPoint.AFTER_COMMIT, 3),
        (" after_publish : 2 ", CrashPoint.AFTER_PUBLISH, 2),
        ("before_commit:", CrashPoint.BEFORE_COMMIT, 1),
    ],
)
def test_parse(text: str, point: CrashPoint | None, on_hit: int) -> None:
    parsed = CrashPoints.parse(text)
    assert (parsed.point, parsed.on_hit) == (point, on_hit)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("before_comit", "unknown crash point 'before_comit'"),
        ("after_commit:x", "count must be an integer"),
        ("after_commit:0", "the count must be 1 or more"),
        ("after_commit:-2", "the count must be 1 or more"),
    ],
)
def test_parse_refuses_with_a_clear_error(text: str, names: str) -> None:
    with pytest.raises(ValueError, match=ENV_VAR) as raised:
        CrashPoints.parse(text)
    assert names in str(raised.value)


def test_unset_is_disarmed_and_never_kills() -> None:
    calls: list[int] = []
    points = armed("", calls)
    for point in CrashPoint:
        for _ in range(5):
            points.reach(point)
    assert calls == [] and points.hits == 0


def test_kills_on_the_first_hit_of_the_armed_point_only() -> None:
    calls: list[int] = []
    points = armed("after_commit", calls)
    points.reach(CrashPoint.BEFORE_COMMIT)
    points.reach(CrashPoint.AFTER_PUBLISH)
    assert calls == []
    with pytest.raises(Killed):
        points.reach(CrashPoint.AFTER_COMMIT)
    assert calls == [1]


def test_kills_on_the_counted_hit() -> None:
    calls: list[int] = []
    points = armed("after_publish:3", calls)
    points.reach(CrashPoint.AFTER_PUBLISH)
    points.reach(CrashPoint.AFTER_COMMIT)  # another point: not counted
    points.reach(CrashPoint.AFTER_PUBLISH)
    assert calls == []
    with pytest.raises(Killed):
        points.reach(CrashPoint.AFTER_PUBLISH)
    assert calls == [1] and points.hits == 3


def test_from_env_warns_when_armed_and_is_silent_when_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="worker.pipeline.crash_points"):
        assert CrashPoints.from_env({}).point is None
        assert caplog.records == []
        points = CrashPoints.from_env({ENV_VAR: "before_commit:2"})
    assert (points.point, points.on_hit) == (CrashPoint.BEFORE_COMMIT, 2)
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.__dict__["crash_point"] == "before_commit"


async def test_guard_commits_copies_the_engine_only_when_before_commit_is_armed() -> None:
    # No connection is made: the engine is only built.
    engine = create_async_engine("postgresql+asyncpg://postgres@127.0.0.1:1/none")
    try:
        assert CrashPoints.disarmed().guard_commits(engine) is engine
        assert CrashPoints(CrashPoint.AFTER_COMMIT).guard_commits(engine) is engine
        guarded = CrashPoints(CrashPoint.BEFORE_COMMIT).guard_commits(engine)
        assert guarded is not engine
        assert guarded.sync_engine.pool is engine.sync_engine.pool  # one pool
    finally:
        await engine.dispose()
