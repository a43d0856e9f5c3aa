"""How the command ends: bad input is one message and exit 1, bad arguments exit 2, a bug is one
line (its traceback with -v) and exit 3, an OS error names the path; user data never names a
path outside its folder."""

from __future__ import annotations

import json
import logging

import pytest

from autoliver import cli
from autoliver.core.errors import AutoliverError, UsageError
from autoliver.core.layout import Workspace, dataset_name, fold_name, inside, plain_name


def run_with(monkeypatch, caplog, exc: BaseException, *flags: str) -> int:
    def boom(args):
        raise exc

    monkeypatch.setattr(cli, "cmd_evaluate", boom)  # build_parser (called by main) binds it
    monkeypatch.setattr(cli, "configure_logging", lambda verbose, quiet: None)  # keep pytest's capture
    caplog.clear()
    caplog.set_level(logging.INFO)
    return cli.main([*flags, "evaluate", "-r", "r", "-p", "p"])


def test_bug_is_one_line_without_traceback_and_exit_3(monkeypatch, caplog):
    assert run_with(monkeypatch, caplog, KeyError("weights")) == 3
    records = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(records) == 1 and "internal error: KeyError" in records[0].getMessage() and "-v" in records[0].getMessage()
    assert not records[0].exc_info


def test_bug_shows_traceback_with_verbose(monkeypatch, caplog):
    assert run_with(monkeypatch, caplog, ZeroDivisionError("x"), "-v") == 3
    assert any(r.exc_info is not None for r in caplog.records if r.levelno >= logging.ERROR)


def test_usage_error_exit_2_and_input_error_exit_1(monkeypatch, caplog):
    assert run_with(monkeypatch, caplog, UsageError("--folds must be numbers")) == 2
    assert run_with(monkeypatch, caplog, AutoliverError("x.nii.gz: truncated; re-export it")) == 1
    assert isinstance(UsageError("x"), ValueError)  # library callers catching ValueError keep working


def test_os_error_names_the_path(monkeypatch, caplog):
    exc = OSError(28, "No space left on device", "/out/case_1.nii.gz")
    assert run_with(monkeypatch, caplog, exc) == 1
    message = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR][-1]
    assert "/out/case_1.nii.gz" in message and "No space left on device" in message


@pytest.mark.parametrize("bad", ["../x", "/tmp/x", "a/b", "..", ".", "", ".hidden", "a\\b", "x\x00y", " x", "a" * 300, 3, None])
def test_plain_name_refuses_anything_that_could_leave_its_folder(bad, tmp_path):
    with pytest.raises(AutoliverError):
        plain_name(bad, "case id", "dataset.json")
    with pytest.raises(AutoliverError):
        inside(tmp_path, bad)


@pytest.mark.parametrize("good", ["case_001", "liver-7", "volume-12.v2", "Dataset003_Liver"])
def test_plain_names_stay_inside(good, tmp_path):
    assert inside(tmp_path, good).parent == tmp_path


def test_fold_names():
    assert fold_name(3) == "fold_3" and fold_name("all") == "fold_all" and fold_name("fold_2") == "fold_2"
    with pytest.raises(ValueError):
        fold_name("../1")


def test_every_dataset_form_names_the_same_artefacts(tmp_path, monkeypatch):
    ws = Workspace(tmp_path / "ws")
    raw = ws.raw / "Dataset007_Liver"
    raw.mkdir(parents=True)
    elsewhere = tmp_path / "data" / "Dataset008_Other"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    for spec in ("Dataset007_Liver", "7", str(raw), str(raw.relative_to(tmp_path))):
        assert dataset_name(spec, ws) == "Dataset007_Liver"
    for spec in (str(elsewhere), "data/Dataset008_Other"):  # absolute and relative paths outside the workspace
        assert dataset_name(spec, ws) == "Dataset008_Other"
        assert ws.dataset(dataset_name(spec, ws)).plans == ws.root / "preprocessed" / "Dataset008_Other" / "plans.json"
    (ws.root / "results" / "Dataset009_Copied").mkdir(parents=True)  # artefacts without the raw data
    assert dataset_name("9", ws) == "Dataset009_Copied"


def test_case_ids_in_dataset_json_cannot_escape(tmp_path):
    from autoliver.io.dataset import discover

    root = tmp_path / "Dataset001_X"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    entries = {"/tmp/x": {"images": ["imagesTr/c_0000.nii.gz"], "label": "labelsTr/c.nii.gz"},
               "../../../../tmp/y": {"images": ["imagesTr/c_0000.nii.gz"], "label": "labelsTr/c.nii.gz"},
               "ok": ["imagesTr/c_0000.nii.gz"], "str": {"images": "imagesTr/c_0000.nii.gz"}}
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1},
                                                   "numTraining": 1, "file_ending": ".nii.gz", "dataset": entries}))
    dataset, problems = discover(root)
    text = "\n".join(problems)
    assert "'/tmp/x' is not a plain name" in text and "'../../../../tmp/y' is not a plain name" in text
    assert "case ok: expected" in text and "case str: \"images\" must be a list" in text
    assert dataset is None or all("/" not in c.case_id for c in dataset.training)


def test_deeply_nested_json_is_one_clear_error(tmp_path):
    from autoliver.io.dataset import load_dataset_json

    (tmp_path / "dataset.json").write_text("[" * 100000 + "]" * 100000)
    dj, problems = load_dataset_json(tmp_path)
    assert dj is None and len(problems) == 1 and "nested too deeply" in problems[0] and str(tmp_path) in problems[0]


def test_splits_command_writes_n_folds_and_refuses_to_replace_trained_splits(tmp_path):
    from autoliver.examples.phantom import write_phantom_dataset
    from autoliver.train.splits import validate_splits

    ws = Workspace(tmp_path / "ws")
    import numpy as np

    write_phantom_dataset(ws.raw, 10, np.random.default_rng(0), shape=(12, 32, 32), spacing=(8.0, 8.0, 8.0), dataset_name="Dataset901_S")
    args = ["--workspace", str(ws.root), "splits", "-d", "901", "--folds", "10", "--no-progress"]
    assert cli.main(args) == 0
    path = ws.dataset("Dataset901_S").model.splits
    splits = validate_splits(json.loads(path.read_text()), None, str(path))
    assert len(splits) == 10 and sorted(c for f in splits for c in f["val"]) == sorted(set(c for f in splits for c in f["val"]))
    assert all(len(f["val"]) == 1 and len(f["train"]) == 9 for f in splits)
    assert cli.main(args) == 1  # exists: needs --overwrite
    fold = ws.dataset("Dataset901_S").model.fold("2d", 3)
    fold.root.mkdir(parents=True)
    fold.latest.write_bytes(b"x")
    assert cli.main([*args, "--overwrite"]) == 1  # a fold was trained with them
    fold.latest.unlink()
    assert cli.main([*args[:-3], "--folds", "5", "--overwrite", "--no-progress"]) == 0
    assert len(json.loads(path.read_text())) == 5


def test_plans_without_configurations_is_one_clear_error(tmp_path):
    from autoliver.core.errors import PlanError
    from autoliver.io.plans_file import load_plans

    paths = Workspace(tmp_path).dataset("Dataset001_X")
    paths.preprocessed.mkdir(parents=True)
    paths.plans.write_text(json.dumps({"schema_version": 1, "dataset_name": "Dataset001_X", "fingerprint_hash": "x", "device": "cpu",
                                       "memory_budget_gb": 8, "labels": {"background": 0}, "data_spacings": {}, "configurations": {},
                                       "normalisation": {"scheme": "ct", "clip_low": -100, "clip_high": 200, "mean": 50, "std": 30}}))
    with pytest.raises(PlanError, match="holds no configuration"):
        load_plans(paths)
