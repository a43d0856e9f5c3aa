"""DICOM-SEG from the command line: ``predict --output-format`` writes a Segmentation of a DICOM
series input that reads back as the NIfTI prediction, refuses it for non-DICOM inputs, and
skips finished cases by the file the format writes last."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from helpers import DATASET

import autoliver.examples
from autoliver.cli import main
from autoliver.io.dicom_seg import read_dicom_seg
from autoliver.io.images import dicom_series_files, read_image

pytestmark = pytest.mark.usefixtures("single_thread")

SERIES = Path(autoliver.examples.__file__).parent / "dicom" / "totalseg_example_dicom20"
PREDICT = ["-c", "2d", "-f", "0", "--no-tta", "--no-roi", "--device", "cpu", "--no-progress"]


def test_predict_writes_a_dicom_seg_equal_to_the_nifti(model_ws, tmp_path):
    out = tmp_path / "out"
    model = ["-m", str(model_ws.results(DATASET))]
    assert main(["predict", "-i", str(SERIES), "-o", str(out), "--output-format", "both", *model, *PREDICT]) == 0
    (nifti,), (seg,) = list(out.glob("*.nii.gz")), list(out.glob("*.dcm"))
    labels, geometry = read_image(nifti)
    assert labels.shape[0] == 20
    from_seg, seg_geometry = read_dicom_seg(seg, dicom_series_files(SERIES))
    np.testing.assert_array_equal(from_seg, labels)
    assert seg_geometry.shape == geometry.shape

    only = tmp_path / "only"
    assert main(["predict", "-i", str(SERIES), "-o", str(only), "--output-format", "dicom-seg", *model, *PREDICT]) == 0
    assert [p.suffix for p in only.iterdir() if not p.name.endswith(".json")] == [".dcm"]
    first = next(only.glob("*.dcm")).stat().st_mtime_ns
    assert main(["predict", "-i", str(SERIES), "-o", str(only), "--output-format", "dicom-seg", *model, *PREDICT]) == 0
    assert next(only.glob("*.dcm")).stat().st_mtime_ns == first  # finished: skipped


def test_dicom_seg_for_a_nifti_input_is_a_usage_error(model_ws, tmp_path, caplog):
    image = next((model_ws.raw / DATASET / "imagesTr").iterdir())
    with caplog.at_level(logging.ERROR):
        rc = main(["predict", "-i", str(image), "-o", str(tmp_path / "o"), "-m", str(model_ws.results(DATASET)),
                   "--output-format", "dicom-seg", *PREDICT])
    assert rc == 2 and "needs DICOM series inputs" in caplog.text
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_convert_from_dicom_seg_gives_a_valid_dataset(tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(SERIES.parent / "dcmqi_ct3slice", src / "patient" / "ct")
    shutil.copy(SERIES.parent / "dcmqi_ct3slice_liver_seg.dcm", src / "patient" / "seg.dcm")
    ws = ["--workspace", str(tmp_path / "ws")]
    assert main(["convert", "--from", "dicom-seg", str(src), "-o", "Dataset005_DicomSeg", "--mapping", "Liver=1", *ws]) == 0
    raw = tmp_path / "ws" / "raw" / "Dataset005_DicomSeg"
    (label,) = list((raw / "labelsTr").iterdir())
    values, _ = read_image(label)
    assert set(np.unique(values)) == {0, 1}
    assert main(["validate", "Dataset005_DicomSeg", *ws]) == 0
    assert main(["convert", "--from", "msd", str(src), "-o", "Dataset006_X", "--mapping", "Liver=1", *ws]) == 2
