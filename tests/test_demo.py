"""`autoliver demo` end to end in its reduced mode (a few training iterations, fast prediction):
every artefact appears, the held-out cases (NIfTI and DICOM) are predicted in their own
geometry, scored and reported, and a re-run resumes instead of redoing the work."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import torch_threads

from autoliver.cli import main
from autoliver.io.images import read_header, read_image

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    ws = tmp_path_factory.mktemp("demo_ws")
    with torch_threads(1):  # the demo has no --threads; one thread is several times faster on two loaded cores
        code = main(["demo", "--workspace", str(ws), "--quick", "--phantoms", "2", "--no-progress", "-np", "1"])
    return ws, code


def test_demo_writes_every_artefact(demo_run, capsys):
    ws, code = demo_run
    assert code == 0
    demo = ws / "demo"
    cases = ["chaos_ct_sample", "phantom_test_000", "totalseg_example_dicom20"]
    for case in cases:
        seg_path = demo / "predictions" / f"{case}.nii.gz"
        ref_path = demo / "test" / "labels" / f"{case}.nii.gz"
        seg, geo = read_image(seg_path)
        ref_geo = read_header(ref_path)[0]
        assert geo.shape == ref_geo.shape and np.allclose(geo.spacing, ref_geo.spacing)
        assert np.allclose(geo.origin, ref_geo.origin) and np.allclose(geo.direction, ref_geo.direction)
        assert set(np.unique(seg)) <= {0, 1, 2}
        report = json.loads((demo / "predictions" / f"{case}.json").read_text())
        assert report["configuration"] == "2d"
    evaluation = json.loads((demo / "evaluation" / "evaluation.json").read_text())
    assert sorted(evaluation["per_case"]) == cases
    assert 0.0 <= evaluation["summary"]["liver"]["dice_per_case"] <= 1.0
    html = (demo / "report.html").read_text(encoding="utf-8")
    assert html.count("<img") >= 3 * len(cases)
    assert all(case in html for case in cases)
    # the raw dataset keeps the shipped cases' attribution alongside (README of the examples)
    assert (ws / "raw" / "Dataset099_Demo" / "dataset.json").is_file()


def test_demo_rerun_resumes(demo_run, capsys):
    ws, _ = demo_run
    checkpoint = ws / "results" / "Dataset099_Demo" / "2d" / "fold_all" / "checkpoint_final.pt"
    seg = ws / "demo" / "predictions" / "chaos_ct_sample.nii.gz"
    before = checkpoint.stat().st_mtime_ns, seg.stat().st_mtime_ns
    assert main(["demo", "--workspace", str(ws), "--quick", "--phantoms", "2", "--no-progress", "-np", "1"]) == 0
    assert (checkpoint.stat().st_mtime_ns, seg.stat().st_mtime_ns) == before
    out = capsys.readouterr().out
    assert "not a clinically useful model" in out
