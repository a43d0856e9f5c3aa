"""A DICOM series with a missing, duplicated or truncated slice, or slices that disagree, is
refused with a message naming the folder, instead of being read with a wrong uniform spacing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from autoliver.core.errors import ImageReadError
from autoliver.io.images import dicom_series_files, read_image

SERIES = Path(__file__).resolve().parents[1] / "autoliver" / "examples" / "dicom" / "totalseg_example_dicom20"


@pytest.fixture
def series(tmp_path) -> Path:
    folder = tmp_path / "series"
    shutil.copytree(SERIES, folder)
    return folder


def ordered(folder: Path) -> list[Path]:
    return [Path(f) for f in dicom_series_files(folder)]


def test_the_complete_series_reads_with_its_spacing(series):
    array, geometry = read_image(series)
    assert array.shape[0] == 20 and geometry.spacing[0] == pytest.approx(2.0)


def test_a_missing_slice_is_refused(series):
    ordered(series)[7].unlink()
    with pytest.raises(ImageReadError, match=r"not evenly spaced: 4\.000 mm .* 2\.000 mm") as err:
        read_image(series)
    assert str(series) in str(err.value)


def test_a_duplicated_slice_is_refused(series):
    files = ordered(series)
    shutil.copy(files[5], series / "copy_of_slice_5")
    with pytest.raises(ImageReadError, match="appear twice"):
        read_image(series)


def test_a_truncated_slice_is_refused(series):
    f = ordered(series)[3]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 200_000])
    with pytest.raises(ImageReadError, match="truncated|cannot be read"):
        read_image(series)


def test_an_end_slice_missing_keeps_a_valid_series(series):
    ordered(series)[-1].unlink()  # a shorter series, still evenly spaced
    array, geometry = read_image(series)
    assert array.shape[0] == 19 and geometry.spacing[0] == pytest.approx(2.0)


def test_series_uid_picks_one_series_of_several(tmp_path):
    import SimpleITK as sitk

    from autoliver.io.validate import read_checked_image

    folder = tmp_path / "two"
    folder.mkdir()
    for f in SERIES.iterdir():
        shutil.copy(f, folder / f.name)
    for f in (SERIES.parent / "dcmqi_ct3slice").iterdir():
        shutil.copy(f, folder / f"b_{f.name}")
    with pytest.raises(ImageReadError, match="--series UID"):
        read_checked_image(folder)
    uid = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(SERIES))[0]
    array, _ = read_checked_image(folder, uid)
    assert array.shape[0] == 20
