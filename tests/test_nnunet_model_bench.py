"""The ``nnunet_model`` benchmark's quick run: autoliver's side on the committed nnU-Net fixture model."""

from __future__ import annotations

import json

import pytest

from benchmarks.__main__ import main


@pytest.mark.slow
@pytest.mark.subprocess
def test_nnunet_model_quick_run_writes_a_report_and_agrees_with_the_fixture(tmp_path):
    assert main(["nnunet_model", "--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "nnunet_model.json").read_text())
    rows = {r["metric"]: r for r in report["results"]["rows"]}
    assert rows["s per case"]["autoliver"] > 0 and rows["peak RSS MiB"]["autoliver"] > 50
    agree = report["results"]["agreement_with_fixture"]["aniso"]
    assert agree["voxels_equal"] >= 0.995 and agree["liver_dice"] >= 0.99
