"""Every command that takes a dataset takes it in every form (absolute or relative folder path,
name, numeric id; positional or ``-d`` as nnU-Net spells it) and finds the same artefacts."""

from __future__ import annotations

import logging
import shutil

import pytest
from helpers import DATASET, FAST, read_log

from autoliver import api, cli
from autoliver.core.layout import Workspace, dataset_name

# command -> (the api function it calls, the argv around the dataset (None marks where it goes))
COMMANDS = {
    "validate": ("validate", ["validate", None]),
    "plan_and_preprocess": ("plan_and_preprocess", ["plan_and_preprocess", None, "--device", "cpu"]),
    "add_configuration": ("add_configuration", ["add_configuration", None, "--recipe", "segnet_vgg16"]),
    "splits": ("write_splits", ["splits", None, "--folds", "3"]),
    "compare": ("compare", ["compare", None, "-c", "2d", "3d_fullres", "--budget-minutes", "1"]),
    "train": ("train", ["train", None, "2d", "0"]),
    "find_best_configuration": ("find_best_configuration", ["find_best_configuration", None]),
    "export_model": ("export_model", ["export_model", None, "-o", "m.zip"]),
    "predict": ("resolve_model_dir", ["predict", "-i", "in", "-o", "out", "-d", None]),
    "report": ("report_dataset", ["report", "-o", "r.html", "-d", None]),
}
FORMS = ("absolute", "relative", "name", "id")
NAME = "Dataset042_Forms"


@pytest.fixture()
def forms(tmp_path, monkeypatch):
    """A workspace whose raw dataset lives in raw/, and the four ways to name it."""
    ws = Workspace(tmp_path / "ws")
    folder = ws.raw / NAME
    folder.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    spec = {"absolute": str(folder), "relative": str(folder.relative_to(tmp_path)), "name": NAME, "id": "42"}
    return ws, spec


def _captured(monkeypatch, function: str) -> list[str]:
    """Replace ``api.<function>`` with one that records the dataset name its argument resolves to."""
    seen: list[str] = []

    def record(*args, **kwargs):
        ws = next(v for v in [*args, *kwargs.values()] if isinstance(v, Workspace))
        spec = args[2] if function == "resolve_model_dir" else kwargs.get("dataset_spec", args[0])
        seen.append(dataset_name(spec, ws))
        raise SystemExit(0)  # stop the command there: only the dataset it names matters here

    monkeypatch.setattr(api, function, record)
    return seen


# predict and report take the dataset only as -d (their other source is -m / -p)
CASES = [(c, form, flag) for c in sorted(COMMANDS) for form in FORMS for flag in (False, True) if flag or "-d" not in COMMANDS[c][1]]


@pytest.mark.parametrize(("command", "form", "flag"), CASES)
def test_every_command_takes_every_form(forms, monkeypatch, command, form, flag):
    ws, spec = forms
    function, argv = COMMANDS[command]
    seen = _captured(monkeypatch, function)
    dataset = ["-d", spec[form]] if flag else [spec[form]]
    at = argv.index(None)
    words = [w for w in argv[:at] if w != "-d"] + dataset + argv[at + 1:]
    with pytest.raises(SystemExit):
        cli.main([*words, "--workspace", str(ws.root)])
    assert seen == [NAME]


def test_train_refuses_the_dataset_twice_or_not_at_all(forms, caplog):
    ws, spec = forms
    assert cli.main(["train", "-d", NAME, NAME, "2d", "0", "--workspace", str(ws.root)]) == 2
    assert cli.main(["train", "2d", "0", "--workspace", str(ws.root)]) == 2
    assert cli.main(["train", NAME, "2d", "fold3", "--workspace", str(ws.root)]) == 2
    assert "FOLD must be" in caplog.text


def test_artefacts_outside_the_workspace_found_by_the_path_just_used(tiny_ws, tmp_path, monkeypatch, caplog):
    """The raw data outside the workspace: train with its absolute path, then predict and
    find_best with the relative path find what that training wrote."""
    elsewhere = tmp_path / "data" / DATASET
    shutil.move(str(tiny_ws.raw / DATASET), elsewhere)
    monkeypatch.chdir(tmp_path)
    root = ["--workspace", str(tiny_ws.root)]
    assert cli.main(["train", str(elsewhere), "2d", "0", "--epochs", "1", "--iters-per-epoch", "2", "--device", "cpu", *FAST, *root]) == 0
    fold = tiny_ws.results(DATASET) / "2d" / "fold_0"
    assert len(read_log(fold / "log.jsonl")) == 1
    image = next((elsewhere / "imagesTr").iterdir())
    out = tmp_path / "pred"
    with caplog.at_level(logging.INFO):
        rc = cli.main(["predict", "-i", str(image), "-o", str(out), "-d", f"data/{DATASET}", "-c", "2d", "-f", "0",
                       "--no-tta", "--no-roi", "--device", "cpu", "--no-progress", *root])
    assert rc == 0
    assert len(list(out.glob("*.nii.gz"))) == 1
    assert (tiny_ws.results(DATASET) / "splits.json").is_file()
