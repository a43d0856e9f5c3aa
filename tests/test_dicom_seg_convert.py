"""Converting DICOM CT series + DICOM-SEG into a raw dataset, on copies of the shipped DICOM cases
(autoliver/examples, attribution in autoliver/examples/README.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from autoliver import examples
from autoliver.core.errors import AutoliverError
from autoliver.core.layout import plain_name
from autoliver.io.dicom_seg import write_dicom_seg
from autoliver.io.dicom_seg_codes import DicomSegError
from autoliver.io.dicom_seg_convert import SegCase, assign_case_ids, convert_dicom_seg, plain_case_id
from autoliver.io.images import read_image
from autoliver.io.validate import check_dataset

CT3 = examples.DICOM_DIR / "dcmqi_ct3slice"
CT3_SEG = examples.DICOM_DIR / "dcmqi_ct3slice_liver_seg.dcm"
CT20 = examples.DICOM_DIR / "totalseg_example_dicom20"


def _copy_series(series: Path, dst: Path, **tags) -> Path:
    """Copy a series' slices, setting ``tags`` (pydicom keywords) on each."""
    dst.mkdir(parents=True)
    for f in sorted(series.iterdir()):
        ds = pydicom.dcmread(f)
        for keyword, value in tags.items():
            setattr(ds, keyword, value)
        ds.save_as(dst / f.name)
    return dst


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """study_a: the 3-slice CT + its shipped SEG; study_b: the 20-slice CT + a SEG written from its
    NIfTI label with a tumour added; hostile Patient IDs; a stray text file and an unlabelled series."""
    root = tmp_path_factory.mktemp("dicom_seg_source") / "src"
    _copy_series(CT3, root / "study_a" / "ct", PatientID="../../x")
    (root / "study_a" / "seg").mkdir()
    (root / "study_a" / "seg" / "liver.dcm").write_bytes(CT3_SEG.read_bytes())
    series = _copy_series(CT20, root / "study_b" / "series 1", PatientID="/etc")
    label, _ = read_image(examples.label_path("totalseg_example_dicom20"))
    label = label.astype(np.uint8)
    label[10][(label[10] == 1) & (np.arange(512)[None, :] < 300)] = 2
    write_dicom_seg(label, sorted(series.iterdir()), root / "study_b" / "seg.dcm")
    _copy_series(CT3, root / "unlabelled", SeriesInstanceUID=pydicom.uid.generate_uid())  # no SEG refers to it
    for f in (root / "unlabelled").iterdir():  # new instance UIDs too
        ds = pydicom.dcmread(f)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(f)
    (root / "study_a" / "notes.txt").write_text("not DICOM")
    return root, label


def test_convert_two_studies(tmp_path, source):
    src, label_b = source
    dst = convert_dicom_seg(src, tmp_path / "out" / "Dataset042_DicomSeg", progress=False)
    assert _listing(tmp_path / "out") == ["Dataset042_DicomSeg", *[f"Dataset042_DicomSeg/{p}" for p in _listing(dst)]]  # nothing beside it
    assert _listing(dst) == ["dataset.json", "imagesTr", "imagesTr/etc_0000.nii.gz", "imagesTr/x_0000.nii.gz",
                             "labelsTr", "labelsTr/etc.nii.gz", "labelsTr/x.nii.gz"]
    assert _listing(tmp_path) == ["out", *[f"out/{p}" for p in _listing(tmp_path / "out")]]
    dataset = check_dataset(dst, progress=False)
    assert sorted(c.case_id for c in dataset.training) == ["etc", "x"]
    dj = json.loads((dst / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "liver": 1, "tumour": 2} and dj["numTraining"] == 2

    expected = {"x": (CT3, read_image(examples.label_path("dcmqi_ct3slice"))[0]), "etc": (CT20, label_b)}
    for case_id, (series, label) in expected.items():
        image, geometry = read_image(dst / "imagesTr" / f"{case_id}_0000.nii.gz")
        got, label_geometry = read_image(dst / "labelsTr" / f"{case_id}.nii.gz")
        source_image, source_geometry = read_image(series)
        np.testing.assert_array_equal(image, source_image)
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, label)
        assert label_geometry == geometry
        np.testing.assert_allclose(geometry.origin, source_geometry.origin, atol=1e-4)
        np.testing.assert_allclose(geometry.spacing, source_geometry.spacing, rtol=1e-5)


def test_mapping_and_case_id_sources(tmp_path, source):
    src, label_b = source
    dst = convert_dicom_seg(src, tmp_path / "Dataset043_Mapped", {"Liver": 2, "Tumour": 0}, case_ids="index", progress=False)
    assert sorted(p.name for p in (dst / "labelsTr").iterdir()) == ["case_001.nii.gz", "case_002.nii.gz"]
    labels = sorted((read_image(p)[0] for p in (dst / "labelsTr").iterdir()), key=lambda a: a.shape[0])
    np.testing.assert_array_equal(labels[0], 2 * read_image(examples.label_path("dcmqi_ct3slice"))[0])
    np.testing.assert_array_equal(labels[1], 2 * (label_b >= 1))


def test_problems_are_listed_and_nothing_is_written(tmp_path):
    src = tmp_path / "src"
    (src / "lonely").mkdir(parents=True)
    lonely = pydicom.dcmread(CT3_SEG)  # made on a series that is absent
    lonely.ReferencedSeriesSequence[0].SeriesInstanceUID = pydicom.uid.generate_uid()
    for ref in [*lonely.ReferencedSeriesSequence[0].ReferencedInstanceSequence,
                *(fg.DerivationImageSequence[0].SourceImageSequence[0] for fg in lonely.PerFrameFunctionalGroupsSequence)]:
        ref.ReferencedSOPInstanceUID = pydicom.uid.generate_uid()
    lonely.save_as(src / "lonely" / "seg.dcm")
    spleen = pydicom.dcmread(CT3_SEG)
    spleen.SegmentSequence[0].SegmentLabel = "Spleen"
    spleen.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue = "78961009"
    spleen.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning = "Spleen"
    spleen.SOPInstanceUID = spleen.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    _copy_series(CT3, src / "with_spleen" / "ct")
    spleen.save_as(src / "with_spleen" / "spleen.dcm")
    rt = pydicom.Dataset()
    rt.SOPClassUID, rt.SOPInstanceUID, rt.Modality = "1.2.840.10008.5.1.4.1.1.481.3", pydicom.uid.generate_uid(), "RTSTRUCT"
    rt.file_meta = pydicom.dataset.FileMetaDataset()
    rt.file_meta.MediaStorageSOPClassUID, rt.file_meta.MediaStorageSOPInstanceUID = rt.SOPClassUID, rt.SOPInstanceUID
    rt.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    rt.save_as(src / "contours.dcm", enforce_file_format=True)
    with pytest.raises(DicomSegError) as info:
        convert_dicom_seg(src, tmp_path / "Dataset044_Bad", progress=False)
    text = str(info.value)
    assert "3 problems" in text
    assert f"{src / 'contours.dcm'}: an RTSTRUCT" in text
    assert f"{src / 'lonely' / 'seg.dcm'}: refers to 6 image(s)" in text and "copy the CT series" in text
    assert f"{src / 'with_spleen' / 'spleen.dcm'}: segment(s) #1 'Spleen'" in text and "--mapping" in text
    assert list(tmp_path.iterdir()) == [src]
    with pytest.raises(AutoliverError, match="DatasetNNN_Name"):
        convert_dicom_seg(src, tmp_path / "out", progress=False)
    with pytest.raises(DicomSegError, match="no DICOM-SEG file found"):
        convert_dicom_seg(src / "with_spleen" / "ct", tmp_path / "Dataset045_None", progress=False)


@pytest.mark.parametrize(("value", "expected"), [
    ("../../x", "x"), ("/etc", "etc"), ("..", ""), (".hidden", "hidden"), ("a/b\\c", "a_b_c"), ("Müller, Anna", "M_ller_Anna"),
    ("1.2.840.113619", "1_2_840_113619"), ("x" * 300, "x" * 64), ("\x00nul\nline", "nul_line"),
])
def test_plain_case_id(value, expected):
    assert plain_case_id(value) == expected


def test_case_ids_are_plain_and_unique():
    def case(i, **tags):
        return SegCase(Path(f"/seg{i}.dcm"), (), {"StudyDate": f"2020010{i}", **tags})

    cases = [case(0, PatientID="../.."), case(1, PatientID="A"), case(2, PatientID="a"), case(3, PatientID="a_1"),
             case(4, PatientID="", StudyInstanceUID="1.2.3"), case(5, PatientID="/", StudyInstanceUID="", SeriesInstanceUID="")]
    ids = assign_case_ids(cases)
    assert ids == ["case_1", "A_2", "a_3", "a_1", "1_2_3", "case_2"]  # "a_1" is someone's own id: skipped
    assert len({i.lower() for i in ids}) == len(ids) and all(plain_name(i) == i for i in ids)
    assert assign_case_ids(cases, "study")[4] == "1_2_3"
    with pytest.raises(AutoliverError, match="unknown"):
        assign_case_ids(cases, "name")
