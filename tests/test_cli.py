"""The `autoliver` command end to end on real example cases: artefacts, resume, bad input."""

import json
import logging
import subprocess
import sys

import pytest
from helpers import copy_workspace

from autoliver.cli import build_parser, main
from autoliver.core.layout import Workspace
from autoliver.examples.dataset import build_example_dataset
from planning.hashing import hash_json
from planning.plans import Plans

SUBCOMMANDS = ["validate", "convert", "example_dataset", "plan", "plan_and_preprocess", "train", "predict",
               "find_best_configuration", "postprocess", "evaluate", "submit", "report", "demo"]


@pytest.mark.subprocess
def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "autoliver.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for name in SUBCOMMANDS:
        assert name in out
    for name in SUBCOMMANDS:
        with pytest.raises(SystemExit) as done:
            build_parser().parse_args([name, "--help"])
        assert done.value.code == 0


@pytest.fixture(scope="module")
def _small_dataset_template(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws")
    build_example_dataset(
        ws / "raw" / "Dataset001_LiverExamples",
        real_cases=("lits117_128cube", "totalseg_example_ct_full", "dcmqi_ct3slice"),
        n_phantoms=1,
        phantom_shape=(48, 96, 96),
    )
    return Workspace(ws)


@pytest.fixture()
def small_dataset(_small_dataset_template, tmp_path):
    """This test's own copy of the raw example dataset (nothing preprocessed yet)."""
    return copy_workspace(_small_dataset_template, tmp_path / "ws").root


@pytest.mark.slow
def test_plan_and_preprocess_then_resume(small_dataset, monkeypatch):
    ws = small_dataset
    monkeypatch.setenv("AUTOLIVER_WORKSPACE", str(ws))  # the fallback for --workspace
    assert main(["plan_and_preprocess", "1", "-np", "2", "--no-progress"]) == 0
    pre = ws / "preprocessed" / "Dataset001_LiverExamples"
    fp = json.loads((pre / "fingerprint.json").read_text())
    plans = Plans.load(pre / "plans.json")
    assert plans.fingerprint_hash == hash_json(fp)
    assert {"2d", "2.5d", "3d_fullres"} <= set(plans.configurations)
    cases = {"lits117_128cube", "totalseg_example_ct_full", "dcmqi_ct3slice", "phantom_000"}
    for data_id in {c.data_identifier for c in plans.configurations.values()}:
        folder = pre / data_id
        done = {p.name.split(".")[0] for p in folder.glob("*.json") if p.name != "dataset_properties.json"}
        assert cases <= done, (data_id, done)
    stamps = {p: p.stat().st_mtime_ns for p in (pre / "fullres").iterdir()}

    # a second run reuses everything: no case file is rewritten
    assert main(["plan_and_preprocess", "Dataset001_LiverExamples", "--workspace", str(ws), "-np", "1", "--no-progress"]) == 0
    for p, t in stamps.items():
        if p.name != "dataset_properties.json":
            assert p.stat().st_mtime_ns == t, p

    # planning from the fingerprint alone reproduces plans.json
    out = ws / "plans_again.json"
    assert main(["plan", "--fingerprint", str(pre / "fingerprint.json"), "-o", str(out)]) == 0
    assert json.loads(out.read_text()) == json.loads((pre / "plans.json").read_text())


def test_invalid_dataset_fails_and_writes_nothing(tmp_path, caplog):
    root = build_example_dataset(tmp_path / "raw" / "Dataset002_Broken", real_cases=("lits117_128cube", "dcmqi_ct3slice"))
    (root / "labelsTr" / "dcmqi_ct3slice.nii.gz").unlink()
    with caplog.at_level(logging.ERROR):
        code = main(["plan_and_preprocess", "Dataset002_Broken", "--workspace", str(tmp_path), "--no-progress"])
    assert code == 1
    assert "dcmqi_ct3slice" in caplog.text
    assert not (tmp_path / "preprocessed").exists()


def test_unknown_configuration_is_a_clear_error(small_dataset, caplog):
    with caplog.at_level(logging.ERROR):
        code = main(["plan_and_preprocess", "1", "--workspace", str(small_dataset), "-c", "3d_lowres", "--no-progress"])
    assert code == 1
    assert "3d_lowres" in caplog.text and "planned" in caplog.text
