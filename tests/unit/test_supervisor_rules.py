"""How many processes ``serve`` starts: the CPU quota, and ``--processes``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from worker.supervisor import MAX_RESTART_DELAY_S, add_process_options, cpu_quota, restart_delay_s

CORES = len(os.sched_getaffinity(0))


def cgroup(root: Path, files: dict[str, str]) -> Path:
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content)
    return root


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "100000 100000\n"}, 1),
        ({"cpu.max": "150000 100000\n"}, min(CORES, 2)),  # 1.5 cores: 2 processes
        ({"cpu.max": "50000 100000\n"}, 1),  # never 0
        ({"cpu.max": "max 100000\n"}, CORES),
        ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, min(CORES, 2)),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, CORES),
        ({"cpu.max": "garbage\n"}, CORES),
        ({}, CORES),
    ],
)
def test_cpu_quota_reads_the_cgroup_and_never_exceeds_the_cpus(
    tmp_path: Path, files: dict[str, str], expected: int
) -> None:
    assert cpu_quota(cgroup(tmp_path, files)) == expected


def test_a_quota_above_the_cpus_is_the_cpus(tmp_path: Path) -> None:
    root = cgroup(tmp_path, {"cpu.max": f"{(CORES + 4) * 100000} 100000\n"})
    assert cpu_quota(root) == CORES


def parse(argv: list[str], env: str | None, monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    if env is None:
        monkeypatch.delenv("WORKER_PROCESSES", raising=False)
    else:
        monkeypatch.setenv("WORKER_PROCESSES", env)
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_process_options(parser)
    return parser.parse_args(argv)


def test_processes_come_from_the_option_then_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert parse([], None, monkeypatch).processes is None  # the CPU quota decides
    assert parse([], "", monkeypatch).processes is None
    assert parse([], "3", monkeypatch).processes == 3
    assert parse(["--processes", "1"], "3", monkeypatch).processes == 1


@pytest.mark.parametrize("bad", ["0", "-2", "two", "1.5"])
def test_a_bad_process_count_is_refused(bad: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(argparse.ArgumentError, match="at least 1"):
        parse(["--processes", bad], None, monkeypatch)


def test_a_process_dying_soon_again_and_again_waits_longer_each_time() -> None:
    assert [restart_delay_s(n) for n in range(7)] == [0, 0, 1, 3, 7, 15, MAX_RESTART_DELAY_S]
    assert restart_delay_s(100) == MAX_RESTART_DELAY_S
