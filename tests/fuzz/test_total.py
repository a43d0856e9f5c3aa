"""The fuzz tests together run at least 1,000 generated cases (when they all ran in this session)."""

from __future__ import annotations

import pytest

from fuzz.counting import COUNTS, KINDS

MIN_TOTAL = 1000


def test_zz_enough_generated_cases_ran():
    if not all(COUNTS[k] for k in KINDS):
        pytest.skip(f"only part of the fuzz tests ran in this session ({dict(COUNTS)})")
    assert sum(COUNTS.values()) >= MIN_TOTAL, dict(COUNTS)
