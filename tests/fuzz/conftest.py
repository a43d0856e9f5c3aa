"""Hypothesis profiles and the example counter for the reader fuzz tests.

Profiles: ``ci`` (the default: derandomised, so every run tries the same examples, a fixed
number per test and a per-example deadline) and ``deep`` (many more examples, random, for local
runs: ``HYPOTHESIS_PROFILE=deep``). Every property test records each example it runs with
``fuzz.counting.count(kind)``; the totals per kind are printed in the terminal summary.
"""

from __future__ import annotations

import faulthandler
import os
import sys
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, settings

from fuzz.counting import COUNTS

HANG_S = 300  # a fuzz test still running after this long is a hang: dump the stacks and stop the run

settings.register_profile(
    "ci", derandomize=True, database=None, deadline=timedelta(seconds=10), print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "deep", parent=settings.get_profile("ci"), derandomize=False, max_examples=20_000, deadline=timedelta(seconds=30),
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def scaled(n: int) -> int:
    """``n`` examples in CI; the deep profile multiplies every test's count by 20."""
    return n * 20 if settings.default.max_examples >= 20_000 else n


@pytest.fixture(autouse=True)
def _hang_guard():
    """A native hang inside a reader cannot be interrupted from Python: after ``HANG_S`` the
    process prints every thread's stack and exits, so CI fails instead of waiting forever."""
    faulthandler.dump_traceback_later(HANG_S, exit=True, file=sys.stderr)
    yield
    faulthandler.cancel_dump_traceback_later()


def pytest_terminal_summary(terminalreporter):
    if COUNTS:
        total = sum(COUNTS.values())
        parts = ", ".join(f"{kind} {n}" for kind, n in sorted(COUNTS.items()))
        terminalreporter.write_line(f"reader fuzzing: {total} generated cases ({parts})")
