"""``make soak``: the fault scenarios over and over, bigger, with a new seed each round.

    python -m tests.faults.soak [--minutes M] [--messages N] [--seed S] [-k EXPR]

Each round runs every fault scenario (the tests named ``test_scenario_*`` under
``tests/faults/``) in one pytest process with ``FAULT_SEED`` and ``FAULT_MESSAGES``
set; the scenarios read both, so a round is a new workload and, where the seed
places the faults, a new fault timeline. Rounds start until ``--minutes`` have
passed (the last one runs to its end). Each scenario's verdict line
(``fault scenario {...}``) is printed as it comes, then a summary: minutes, rounds, scenario
runs, messages, faults, and the totals of everything that must be 0. The exit code
is 1 if any total is not 0 or any pytest run failed (its output is shown then).

Defaults come from ``SOAK_MINUTES`` (30), ``SOAK_MESSAGES`` (10000) and ``SOAK_SEED``
(the clock, so that every soak differs; the summary names the seeds to replay one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
VERDICT_PREFIX = "fault scenario "
SCENARIOS = "test_scenario_"
# Verdict figures that must all be 0, summed over every scenario run.
MUST_BE_ZERO = (
    "lost",
    "doubled",
    "wrong",
    "unexpected",
    "misrouted",
    "deadletter.missing",
    "deadletter.wrong_reason",
    "deadletter.altered",
    "redis.stale",
    "redis.bad_ttl",
)
OUTPUT_SHOWN_LINES = 200


@dataclass
class Tally:
    rounds: int = 0
    elapsed_s: float = 0.0
    runs: int = 0
    messages: int = 0
    faults: int = 0
    failed_rounds: list[int] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MUST_BE_ZERO, 0))

    def add(self, verdict: dict[str, Any]) -> None:
        self.runs += 1
        self.messages += int(verdict.get("messages", 0))
        self.faults += len(verdict.get("faults", []))
        for name in MUST_BE_ZERO:
            self.totals[name] += int(verdict.get(name, 0))

    @property
    def ok(self) -> bool:
        return not self.failed_rounds and not any(self.totals.values()) and self.runs > 0

    def summary(self) -> dict[str, Any]:
        return {
            "soak": "ok" if self.ok else "FAILED",
            "minutes": round(self.elapsed_s / 60, 1),
            "rounds": self.rounds,
            "scenario_runs": self.runs,
            "messages": self.messages,
            "faults": self.faults,
            **self.totals,
            "failed_rounds": self.failed_rounds,
            "seeds": self.seeds,
        }


def verdicts(lines: Sequence[str]) -> Iterator[dict[str, Any]]:
    """The verdicts among a pytest run's output lines."""
    for line in lines:
        if line.startswith(VERDICT_PREFIX):
            found = json.loads(line.removeprefix(VERDICT_PREFIX))
            if isinstance(found, dict):
                yield found


def run_round(seed: int, messages: int, selection: str) -> tuple[int, list[str]]:
    """One pytest run of the selected scenarios; its exit code and output lines, the
    verdict lines echoed as they come."""
    env = {**os.environ, "FAULT_SEED": str(seed), "FAULT_MESSAGES": str(messages)}
    env["FAULT_SOAK"] = "1"  # scenarios may add cases that `make test` leaves out
    command = [
        sys.executable,
        "-m",
        "pytest",
        "tests/faults",
        "-k",
        selection,
        "-s",
        "-q",
        "-p",
        "no:cacheprovider",
    ]
    lines: list[str] = []
    with subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    ) as process:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.rstrip("\n")
            lines.append(line)
            if line.startswith(VERDICT_PREFIX):
                print(line, flush=True)
    return process.returncode, lines


def soak(minutes: float, messages: int, first_seed: int, selection: str) -> Tally:
    tally = Tally()
    started = time.monotonic()
    deadline = started + minutes * 60
    while tally.rounds == 0 or time.monotonic() < deadline:
        seed = first_seed + tally.rounds
        tally.rounds += 1
        tally.seeds.append(seed)
        print(f"soak round {tally.rounds}: FAULT_SEED={seed} FAULT_MESSAGES={messages}", flush=True)
        code, lines = run_round(seed, messages, selection)
        found = list(verdicts(lines))
        for verdict in found:
            tally.add(verdict)
        if code != 0 or not found:
            tally.failed_rounds.append(tally.rounds)
            print("\n".join(lines[-OUTPUT_SHOWN_LINES:]), flush=True)
            print(f"soak round {tally.rounds}: pytest exited {code}", flush=True)
        tally.elapsed_s = time.monotonic() - started
    return tally


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.soak", description=__doc__)
    parser.add_argument(
        "--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", "30"))
    )
    parser.add_argument(
        "--messages", type=int, default=int(os.environ.get("SOAK_MESSAGES", "10000"))
    )
    parser.add_argument(
        "--seed", type=int, default=int(os.environ.get("SOAK_SEED", str(int(time.time()))))
    )
    parser.add_argument(
        "-k", dest="selection", default=SCENARIOS, help="pytest -k expression of the scenarios"
    )
    args = parser.parse_args(argv)
    tally = soak(args.minutes, args.messages, args.seed, args.selection)
    print(f"soak summary {json.dumps(tally.summary())}", flush=True)
    return 0 if tally.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
