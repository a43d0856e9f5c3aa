"""DICOM-SEG writing and reading against the shipped DICOM cases (autoliver/examples, with their
attribution in autoliver/examples/README.md): the dcmqi 3-slice CT with its DICOM-SEG, and the
20-slice TotalSegmentator series with its NIfTI label. The slice order of reference is SimpleITK's
(``dicom_series_files`` / ``read_image``), computed independently of the code under test."""

from __future__ import annotations

import random
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from autoliver import examples
from autoliver.core.errors import UsageError
from autoliver.io import dicom_seg
from autoliver.io.dicom_seg import export_dicom_seg, read_dicom_seg, write_dicom_seg
from autoliver.io.dicom_seg_codes import DicomSegError, label_from_text, parse_mapping
from autoliver.io.dicom_series_headers import instance_uid
from autoliver.io.images import Geometry, dicom_series_files, read_image, write_image

CT3 = examples.DICOM_DIR / "dcmqi_ct3slice"
CT3_SEG = examples.DICOM_DIR / "dcmqi_ct3slice_liver_seg.dcm"
CT20 = examples.DICOM_DIR / "totalseg_example_dicom20"


def _with_tumours(label: np.ndarray) -> np.ndarray:
    """The liver-only example label with two tumours inside the liver (so labels 0, 1 and 2 occur)."""
    out = label.astype(np.uint8).copy()
    z, y, x = np.nonzero(out == 1)
    zz, yy, xx = np.ogrid[: out.shape[0], : out.shape[1], : out.shape[2]]
    for k in (len(z) // 3, 2 * len(z) // 3):
        ball = (zz - z[k]) ** 2 * 16 + (yy - y[k]) ** 2 + (xx - x[k]) ** 2 <= 12**2
        out[ball & (out == 1)] = 2
    return out


@pytest.fixture(scope="module")
def ct20_label() -> np.ndarray:
    label, _ = read_image(examples.label_path("totalseg_example_dicom20"))
    return _with_tumours(label)


def _frames_by_uid(seg_path: Path) -> dict[tuple[str, int], np.ndarray]:
    """(referenced instance UID, segment number) -> frame pixels, read with highdicom alone."""
    seg = hd.seg.segread(str(seg_path))
    frames = {}
    for i, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        uid = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        frames[(str(uid), int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber))] = seg.get_stored_frame(i + 1)
    return frames


def _uids_in_sitk_order(folder: Path) -> list[str]:
    return [instance_uid(pydicom.dcmread(f, stop_before_pixels=True)) for f in dicom_series_files(folder)]


def test_shipped_seg_equals_the_shipped_nifti_label():
    label, label_geom = read_image(examples.label_path("dcmqi_ct3slice"))
    _, series_geom = read_image(CT3)
    got, geom = read_dicom_seg(CT3_SEG, sorted(CT3.iterdir()))
    assert got.dtype == np.uint8 and got.shape == label.shape == (3, 512, 512)
    assert int(np.count_nonzero(got == 1)) == 107_098  # the liver count the examples README gives
    np.testing.assert_array_equal(got, label)  # all 786,432 voxels equal
    assert geom.shape == series_geom.shape
    np.testing.assert_allclose(geom.origin, series_geom.origin, atol=1e-4)
    np.testing.assert_allclose(geom.spacing, label_geom.spacing, rtol=1e-5)
    # placed by Image Position alone (no series files), on the NIfTI label's grid: the same voxels
    by_position, _ = read_dicom_seg(CT3_SEG, label_geom)
    np.testing.assert_array_equal(by_position, label)


def test_write_then_read_back_20_slices(tmp_path, ct20_label):
    _, geometry = read_image(CT20)
    files = [str(p) for p in CT20.iterdir()]
    random.Random(0).shuffle(files)
    out = write_dicom_seg(ct20_label, files, tmp_path / "seg.dcm", geometry=geometry, algorithm_version="9.9")
    assert out == tmp_path / "seg.dcm" and sorted(p.name for p in tmp_path.iterdir()) == ["seg.dcm"]
    back, _ = read_dicom_seg(out, files)
    np.testing.assert_array_equal(back, ct20_label)
    by_position, _ = read_dicom_seg(out, geometry)
    np.testing.assert_array_equal(by_position, ct20_label)

    seg = hd.seg.segread(str(out))
    assert seg.SegmentationType == "BINARY" and seg.SeriesDescription == dicom_seg.DEFAULT_DESCRIPTION
    liver, tumour = seg.SegmentSequence
    assert (liver.SegmentLabel, liver.SegmentedPropertyTypeCodeSequence[0].CodeValue) == ("Liver", "10200004")
    assert (tumour.SegmentLabel, tumour.SegmentedPropertyTypeCodeSequence[0].CodeValue) == ("Tumour", "108369006")
    assert tumour.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert liver.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "autoliver"
    assert liver.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == "9.9"
    # empty frames are left out: one frame per (slice, segment) holding voxels of that segment
    expected = int((ct20_label >= 1).any(axis=(1, 2)).sum() + (ct20_label == 2).any(axis=(1, 2)).sum())
    assert seg.NumberOfFrames == expected < 2 * 20
    # every frame refers to the slice SimpleITK puts at its index, and holds that slice's mask
    frames = _frames_by_uid(out)
    for k, uid in enumerate(_uids_in_sitk_order(CT20)):
        for number, mask in ((1, ct20_label[k] >= 1), (2, ct20_label[k] == 2)):
            frame = frames.get((uid, number))
            assert (frame is not None) == bool(mask.any())
            if frame is not None:
                np.testing.assert_array_equal(frame.astype(bool), mask)


def test_frame_to_slice_mapping_ignores_the_order_files_are_given_in(tmp_path, ct20_label):
    files = sorted(str(p) for p in CT20.iterdir())
    written = {}
    for name, order in (("sorted", files), ("reversed", files[::-1]), ("shuffled", random.Random(1).sample(files, len(files)))):
        written[name] = _frames_by_uid(write_dicom_seg(ct20_label, order, tmp_path / f"{name}.dcm", verify=False))
    assert written["sorted"].keys() == written["reversed"].keys() == written["shuffled"].keys()
    for key, frame in written["sorted"].items():
        np.testing.assert_array_equal(written["reversed"][key], frame)
        np.testing.assert_array_equal(written["shuffled"][key], frame)
    by_uid = {uid: k for k, uid in enumerate(_uids_in_sitk_order(CT20))}
    for (uid, number), frame in written["shuffled"].items():
        k = by_uid[uid]
        np.testing.assert_array_equal(frame.astype(bool), ct20_label[k] >= 1 if number == 1 else ct20_label[k] == 2)


def test_series_stacked_the_other_way(tmp_path):
    """Column direction flipped: the slice normal points to the feet, so the volume's slice 0 is
    the highest file position; frames must follow SimpleITK's stacking, not file order."""
    series = tmp_path / "flipped"
    series.mkdir()
    for f in sorted(CT3.iterdir()):
        ds = pydicom.dcmread(f)
        ds.ImageOrientationPatient = [1, 0, 0, 0, -1, 0]
        ds.save_as(series / f.name)
    image, geometry = read_image(series)
    assert geometry.direction[8] == -1.0
    labels = np.zeros(image.shape, dtype=np.uint8)
    for k in range(3):  # a different square on each slice, a tumour on slice 2 only
        labels[k, 40 * k + 10 : 40 * k + 90, 100:200] = 1
    labels[2, 60:80, 120:140] = 2
    out = write_dicom_seg(labels, sorted(series.iterdir()), tmp_path / "seg.dcm", geometry=geometry)
    np.testing.assert_array_equal(read_dicom_seg(out, list(series.iterdir()))[0], labels)
    np.testing.assert_array_equal(read_dicom_seg(out, geometry)[0], labels)
    frames = _frames_by_uid(out)
    for k, uid in enumerate(_uids_in_sitk_order(series)):
        np.testing.assert_array_equal(frames[(uid, 1)].astype(bool), labels[k] >= 1)


def test_export_a_prediction_file_of_a_dicom_input(tmp_path):
    _, geometry = read_image(CT3)
    label = _with_tumours(read_image(examples.label_path("dcmqi_ct3slice"))[0])
    write_image(tmp_path / "case.nii.gz", label, geometry)
    out = export_dicom_seg(tmp_path / "case.nii.gz", CT3, tmp_path / "case.dcm", algorithm_version="1.0")
    np.testing.assert_array_equal(read_dicom_seg(out, dicom_series_files(CT3))[0], label)
    mirrored = Geometry(geometry.shape, geometry.spacing, geometry.origin, (-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    write_image(tmp_path / "other.nii.gz", label[:, :, ::-1].copy(), mirrored)
    with pytest.raises(UsageError, match="not the grid of the series"):
        export_dicom_seg(tmp_path / "other.nii.gz", CT3, tmp_path / "other.dcm")
    assert not (tmp_path / "other.dcm").exists()


def test_verification_failure_writes_nothing(tmp_path, monkeypatch, ct20_label):
    files = list(CT20.iterdir())
    monkeypatch.setattr(dicom_seg, "read_dicom_seg", lambda path, ref, mapping=None: (np.zeros_like(ct20_label), None))
    with pytest.raises(DicomSegError, match="differs from the labels"):
        write_dicom_seg(ct20_label, files, tmp_path / "seg.dcm")
    assert list(tmp_path.iterdir()) == []


def test_bad_labels_and_foreign_geometry_are_refused(tmp_path, ct20_label):
    files = list(CT20.iterdir())
    with pytest.raises(UsageError, match="do not fit the series"):
        write_dicom_seg(ct20_label[:10], files, tmp_path / "a.dcm")
    with pytest.raises(UsageError, match="only 0"):
        write_dicom_seg(np.full(ct20_label.shape, 3, np.uint8), files, tmp_path / "b.dcm")
    _, geometry = read_image(CT20)
    shifted = Geometry(geometry.shape, geometry.spacing, (geometry.origin[0], geometry.origin[1], geometry.origin[2] + 1.0), geometry.direction)
    with pytest.raises(UsageError, match="not the grid of the series"):
        write_dicom_seg(ct20_label, files, tmp_path / "c.dcm", geometry=shifted)
    assert list(tmp_path.iterdir()) == []


def test_seg_that_does_not_fit_the_series_names_the_file(tmp_path):
    with pytest.raises(DicomSegError, match=r"dcmqi_ct3slice_liver_seg\.dcm: frame pixel spacing .* does not fit the series' geometry"):
        read_dicom_seg(CT3_SEG, list(CT20.iterdir()))
    other = tmp_path / "same_grid_other_instances"
    other.mkdir()
    for f in sorted(CT3.iterdir()):
        ds = pydicom.dcmread(f)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(other / f.name)
    with pytest.raises(DicomSegError, match=r"dcmqi_ct3slice_liver_seg\.dcm: frame 1 refers to image .* not in the given series"):
        read_dicom_seg(CT3_SEG, list(other.iterdir()))
    _, geometry = read_image(CT3)
    half_slice = Geometry(geometry.shape, geometry.spacing, (geometry.origin[0], geometry.origin[1], geometry.origin[2] + 0.5), geometry.direction)
    with pytest.raises(DicomSegError, match=r"dcmqi_ct3slice_liver_seg\.dcm: frame 1 .*do not fit the series geometry"):
        read_dicom_seg(CT3_SEG, half_slice)
    with pytest.raises(DicomSegError, match="not a readable DICOM Segmentation"):
        read_dicom_seg(examples.label_path("dcmqi_ct3slice"), geometry)


def test_segment_mapping(tmp_path):
    label, geometry = read_image(examples.label_path("dcmqi_ct3slice"))
    as_tumour, _ = read_dicom_seg(CT3_SEG, geometry, mapping={"LIVER": 2})
    np.testing.assert_array_equal(as_tumour, label * 2)
    ignored, _ = read_dicom_seg(CT3_SEG, geometry, mapping={"liver": 0})
    assert not ignored.any()
    renamed = pydicom.dcmread(CT3_SEG)
    renamed.SegmentSequence[0].SegmentLabel = "Spleen"
    renamed.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue = "78961009"
    renamed.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning = "Spleen"
    renamed.save_as(tmp_path / "spleen.dcm")
    with pytest.raises(DicomSegError, match=r"spleen\.dcm: segment\(s\) #1 'Spleen'.*--mapping"):
        read_dicom_seg(tmp_path / "spleen.dcm", geometry)
    with pytest.raises(DicomSegError, match="Spleen"):
        read_dicom_seg(tmp_path / "spleen.dcm", geometry, mapping={"Liver": 1})
    with pytest.raises(UsageError, match="0 \\(ignore\\), 1 \\(liver\\) or 2"):
        read_dicom_seg(CT3_SEG, geometry, mapping={"Liver": 3})


@pytest.mark.parametrize(("text", "label"), [
    ("Liver", 1), ("liver parenchyma", 1), ("Liver Tumor", 2), ("tumour", 2), ("Lesion 3", 2), ("MASS", 2),
    ("Neoplasm, Primary", 2), ("liver metastases", 2), ("Liver vessels", None), ("Spleen", None), ("Segment_1", None), ("", None),
])
def test_label_from_text(text, label):
    assert label_from_text(text) == label


def test_parse_mapping():
    assert parse_mapping(["Liver=1", "Liver Tumor = 2", "a=b=0"]) == {"Liver": 1, "Liver Tumor": 2, "a=b": 0}
    for bad in (["Liver"], ["=1"], ["Liver=x"], ["Liver=5"]):
        with pytest.raises(UsageError):
            parse_mapping(bad)

