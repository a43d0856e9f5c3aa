"""kill -9 during plan_and_preprocess and predict, at seeded points, then a plain re-run: the
outputs are byte-identical to an uninterrupted run and no temporary file is left.

Each stage is killed 20 times in a row (every re-run is itself killed at the next seeded
point, counting from its own start), then run to the end. The points are the stage's own
(``preprocess.case``) and every atomic write between its temporary file and its rename
(``atomic.before_rename``), so kills fall before, inside and between cases."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from faults import contents, differing, run_cli, stale_temporaries
from helpers import DATASET

from autoliver.core.layout import Workspace

pytestmark = pytest.mark.subprocess

KILLS = 20
def survive_kills(argv: list[str], points: dict[str, tuple[int, int]], seed: int, output: Path, expected: dict, logs: Path) -> int:
    """Run ``argv`` again and again, each run killed at a "POINT:N" drawn from a generator
    seeded ``seed`` (N counts from that run's start), until ``KILLS`` runs were killed. A run
    that ends before its point has finished the job: its output must equal ``expected``
    byte for byte (no temporary left), and it is wiped to start over. At the end one more run
    finishes. Returns how many runs finished along the way."""
    logs.mkdir(exist_ok=True)
    rng, names = np.random.default_rng(seed), sorted(points)
    killed = finished = 0
    while killed < KILLS:
        name = names[int(rng.integers(len(names)))]
        spec = f"{name}:{int(rng.integers(points[name][0], points[name][1] + 1))}"
        run = run_cli(argv, kill_at=spec, log_path=logs / f"run{killed}_{finished}.log")
        assert run.killed or run.exitcode == 0, f"{spec}: exit {run.exitcode}\n{run.tail()}"
        killed += run.killed
        if not run.killed:
            finished += 1
            _check(output, expected)
            shutil.rmtree(output)
    run = run_cli(argv, log_path=logs / "final.log")
    assert run.exitcode == 0, run.tail()
    _check(output, expected)
    return finished


def _check(output: Path, expected: dict) -> None:
    assert differing(expected, contents(output)) == []
    assert stale_temporaries(output) == []


def test_plan_and_preprocess_survives_20_kills(tiny_ws, tmp_path):
    raw = tmp_path / "raw" / DATASET
    shutil.copytree(tiny_ws.raw / DATASET, raw)
    ref, hurt = Workspace(tmp_path / "ref"), Workspace(tmp_path / "hurt")
    argv = ["plan_and_preprocess", str(raw), "--device", "cpu", "-np", "1", "--no-progress"]
    assert run_cli([*argv, "--workspace", str(ref.root)], log_path=tmp_path / "ref.log").exitcode == 0
    n_cases = len(list((raw / "imagesTr").iterdir()))
    points = {"preprocess.case": (1, 2), "atomic.before_rename": (1, n_cases)}
    survive_kills([*argv, "--workspace", str(hurt.root)], points, 7, hurt.preprocessed(DATASET), contents(ref.preprocessed(DATASET)),
                  tmp_path / "logs")


def test_predict_survives_20_kills(model_ws, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(model_ws.raw / DATASET / "imagesTr", images)
    argv = ["predict", "-i", str(images), "-m", str(model_ws.results(DATASET)), "-c", "2d", "-f", "0", "1",
            "--device", "cpu", "--no-progress", "--no-roi"]
    assert run_cli([*argv, "-o", str(tmp_path / "ref")], log_path=tmp_path / "ref.log").exitcode == 0
    n_cases = len(list(images.iterdir()))
    expected = contents(tmp_path / "ref")
    assert len(expected) >= 2 * n_cases
    survive_kills([*argv, "-o", str(tmp_path / "hurt")], {"atomic.before_rename": (1, 3)}, 11, tmp_path / "hurt", expected,
                  tmp_path / "logs")
