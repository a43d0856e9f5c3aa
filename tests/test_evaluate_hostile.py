"""evaluate never scores a prediction it cannot trust: all-NaN voxels (which ITK reads as 0) and
a truncated file (which ITK would zero-fill) are errors naming the file, not a Dice of 0."""

from __future__ import annotations

import gzip
import logging

import numpy as np
import pytest
import SimpleITK as sitk

from autoliver.cli import main

REF = np.zeros((8, 16, 16), np.uint8)
REF[2:6, 4:12, 4:12] = 1


def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


@pytest.fixture()
def folders(tmp_path):
    _write(tmp_path / "ref" / "a.nii.gz", REF)
    return tmp_path / "ref", tmp_path / "pred"


def _evaluate(ref, pred, caplog) -> tuple[int, str]:
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        rc = main(["-q", "evaluate", "-r", str(ref), "-p", str(pred), "--no-progress"])
    return rc, caplog.text


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_prediction_is_refused(folders, caplog, bad):
    ref, pred = folders
    values = REF.astype(np.float32)
    values[0, 0, :3] = bad
    _write(pred / "a.nii.gz", values)
    rc, text = _evaluate(ref, pred, caplog)
    assert rc == 1 and "a.nii.gz" in text and "3 NaN/Inf voxels" in text


def test_float_labels_that_are_integers_are_scored(folders, caplog, tmp_path):
    ref, pred = folders
    _write(pred / "a.nii.gz", REF.astype(np.float32))
    rc, _ = _evaluate(ref, pred, caplog)
    assert rc == 0


def test_truncated_prediction_is_refused(folders, caplog):
    ref, pred = folders
    _write(pred / "a.nii", REF)
    data = (pred / "a.nii").read_bytes()
    (pred / "a.nii").unlink()
    (pred / "a.nii.gz").write_bytes(gzip.compress(data[: len(data) - 600]))  # the last slices missing
    rc, text = _evaluate(ref, pred, caplog)
    assert rc == 1 and "a.nii.gz" in text
