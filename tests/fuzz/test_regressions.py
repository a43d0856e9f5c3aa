"""Minimal failing examples the fuzzers found, kept as files in ``regressions/``: each must be
refused with an AutoliverError naming the file (never another exception, never read)."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoliver.core.artefacts import FoldMetrics
from autoliver.core.errors import PlanError
from autoliver.io.inference_plan import load_inference_plan
from autoliver.io.jsonfile import read_json
from autoliver.io.validate import read_checked_image
from fuzz.strategies import outcome
from planning.fingerprint import load_fingerprint
from planning.plans import Plans

JSON_READERS = {  # <artefact>__<what>.json
    "metrics": lambda p: FoldMetrics.from_json(read_json(p, PlanError), str(p)).mean,
    "plans": Plans.load,
    "fingerprint": load_fingerprint,
    "inference_plan": load_inference_plan,
}

REGRESSIONS = Path(__file__).resolve().parent / "regressions"
CASES = sorted(p for p in REGRESSIONS.iterdir() if p.suffix != ".md")


def test_the_kept_examples_are_there():
    assert len(CASES) >= 2


@pytest.mark.parametrize("source", CASES, ids=[p.name for p in CASES])
def test_kept_failing_example_is_refused(source, tmp_path):
    path = tmp_path / source.name
    path.write_bytes(source.read_bytes())
    reader = JSON_READERS[source.name.split("__")[0]] if source.suffix == ".json" else read_checked_image
    result, error = outcome(reader, path)
    assert error is not None and result is None, f"{source.name} was read"
