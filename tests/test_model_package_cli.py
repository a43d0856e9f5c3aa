"""The package commands from the command line: ``export_model`` writes a zip, ``predict -m
model.zip`` installs it once into the workspace's cache and predicts what the model folder
predicts, ``install_model`` puts it under ``models/<name>/``."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import DATASET

from autoliver.cli import main
from autoliver.io.images import read_image

pytestmark = pytest.mark.usefixtures("single_thread")

PREDICT = ["-c", "2d", "-f", "0", "--no-tta", "--no-roi", "--device", "cpu", "--no-progress"]


def test_export_predict_from_zip_and_install(model_ws, tmp_path):
    ws = ["--workspace", str(model_ws.root)]
    package = tmp_path / "liver.zip"
    assert main(["export_model", DATASET, "-c", "2d", "-f", "0", "-o", str(package), *ws]) == 0
    image = next((model_ws.raw / DATASET / "imagesTr").iterdir())
    direct, packaged = tmp_path / "direct", tmp_path / "packaged"
    assert main(["predict", "-i", str(image), "-o", str(direct), "-m", str(model_ws.results(DATASET)), *PREDICT]) == 0
    other = ["--workspace", str(tmp_path / "elsewhere")]
    assert main(["predict", "-i", str(image), "-o", str(packaged), "-m", str(package), *PREDICT, *other]) == 0
    (a, _), = [read_image(p) for p in direct.glob("*.nii.gz")]
    (b, _), = [read_image(p) for p in packaged.glob("*.nii.gz")]
    np.testing.assert_array_equal(a, b)
    cached = list((tmp_path / "elsewhere" / "models" / ".cache").iterdir())
    assert len(cached) == 1 and (cached[0] / "manifest.json").is_file()

    assert main(["install_model", str(package), *other]) == 0
    assert (tmp_path / "elsewhere" / "models" / DATASET / "2d" / "fold_0").is_dir()


def test_predict_from_zip_without_a_workspace_is_refused_clearly(model_ws, tmp_path, caplog):
    package = tmp_path / "liver.zip"
    assert main(["export_model", "-d", DATASET, "-c", "2d", "-f", "0", "-o", str(package), "--workspace", str(model_ws.root)]) == 0
    from autoliver import api
    from autoliver.core.errors import UsageError

    with pytest.raises(UsageError, match="needs a workspace"):
        api.resolve_model_dir(None, package)
