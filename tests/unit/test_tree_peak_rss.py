"""``bench.stack.TreePeakRss``: the peak RSS of a benchmarked command is its own and its
children's, never the memory of the benchmark process that started it."""

from __future__ import annotations

import os
import subprocess
import sys

from bench.stack import TreePeakRss

MIB = 1024 * 1024
# A grandchild holding 160 MB (touched, so resident) for half a second.
GRANDCHILD = "b = bytearray(160 * 1024 * 1024); import time; time.sleep(0.5)"
CHILD = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {GRANDCHILD!r}])"


def test_a_small_child_of_a_big_process_is_measured_small() -> None:
    ballast = bytearray(400 * MIB)  # this process, grown big before the fork
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    with TreePeakRss(process.pid) as peak:
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.returncode == 0
    del ballast
    assert 0 < peak.mb < 100, peak.mb
    # What the benchmarks read before: the child's ru_maxrss counts the fork's memory.
    assert usage.ru_maxrss / 1024 > 400


def test_a_grandchild_s_memory_counts() -> None:
    process = subprocess.Popen([sys.executable, "-c", CHILD])
    with TreePeakRss(process.pid) as peak:
        assert process.wait(timeout=30) == 0
    assert 160 <= peak.mb < 250, peak.mb
