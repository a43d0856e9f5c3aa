"""validate_dataset: one test per kind of bad input, all problems at once, nothing written."""

from __future__ import annotations

import gzip
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autoliver import examples
from autoliver.core.errors import DatasetError
from autoliver.io.images import Geometry, read_header, write_image
from autoliver.io.validate import check_dataset, validate_dataset

EYE = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
GEOM = Geometry((6, 7, 8), (2.5, 0.75, 0.75), (-10.0, 20.0, -30.0), EYE)
LABELS = {"background": 0, "liver": 1, "tumour": 2}


def _image() -> np.ndarray:
    return np.random.default_rng(1).integers(-1000, 400, GEOM.shape).astype(np.int16)


def _label() -> np.ndarray:
    label = np.zeros(GEOM.shape, np.uint8)
    label[2:5, 2:6, 2:7] = 1
    label[3, 3, 3:5] = 2
    return label


def make_dataset(root: Path, cases=("a", "b"), test=("t",), channels=1) -> Path:
    for case in cases:
        for c in range(channels):
            write_image(root / "imagesTr" / f"{case}_{c:04d}.nii.gz", _image(), GEOM)
        write_image(root / "labelsTr" / f"{case}.nii.gz", _label(), GEOM)
    for case in test:
        for c in range(channels):
            write_image(root / "imagesTs" / f"{case}_{c:04d}.nii.gz", _image(), GEOM)
    dj = {"channel_names": {str(c): f"CT{c}" for c in range(channels)}, "labels": LABELS, "numTraining": len(cases), "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(dj))
    return root


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def problems_of(root: Path, **kwargs) -> list[str]:
    """Validate, checking that nothing was written and that check_dataset raises the same list."""
    before = snapshot(root.parent)
    _, problems = validate_dataset(root, progress=False, **kwargs)
    assert snapshot(root.parent) == before
    if problems:
        with pytest.raises(DatasetError) as err:
            check_dataset(root, progress=False, **kwargs)
        assert err.value.problems == problems
    return problems


def only_problem(root: Path, path: Path, *fragments: str, **kwargs) -> str:
    problems = problems_of(root, **kwargs)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}: "), problems[0]
    for fragment in fragments:
        assert fragment in problems[0], problems[0]
    return problems[0]


@pytest.fixture
def ds(tmp_path) -> Path:
    return make_dataset(tmp_path / "Dataset001_Tiny")


def test_valid_synthetic_dataset(ds):
    dataset = check_dataset(ds, progress=False)
    assert [c.case_id for c in dataset.training] == ["a", "b"]
    assert [c.case_id for c in dataset.test] == ["t"]


def test_real_example_cases_pass(tmp_path):
    root = tmp_path / "Dataset002_Examples"
    cases = ("lits117_128cube", "dcmqi_ct3slice", "totalseg_example_ct_sm")
    for case in cases:
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        (root / "labelsTr").mkdir(exist_ok=True)
        shutil.copyfile(examples.image_path(case), root / "imagesTr" / f"{case}_0000.nii.gz")
        shutil.copyfile(examples.label_path(case), root / "labelsTr" / f"{case}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": 3, "file_ending": ".nii.gz"}))
    assert problems_of(root) == []
    # The liver-only declaration makes lits117's tumour voxels (value 2) a problem.
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "numTraining": 3, "file_ending": ".nii.gz"}))
    only_problem(root, root / "labelsTr" / "lits117_128cube.nii.gz", "label values [2] are not declared")


def test_missing_label(ds):
    (ds / "labelsTr" / "b.nii.gz").unlink()
    only_problem(ds, ds / "labelsTr" / "b.nii.gz", "missing label for training case b")


def test_extra_label(ds):
    shutil.copyfile(ds / "labelsTr" / "a.nii.gz", ds / "labelsTr" / "c.nii.gz")
    only_problem(ds, ds / "labelsTr" / "c.nii.gz", "label without an image")


def test_truncated_image(ds):
    path = ds / "imagesTr" / "a_0000.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    only_problem(ds, path, "truncated", "re-copy")


def test_truncated_real_label(tmp_path):
    root = tmp_path / "Dataset002_Examples"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    shutil.copyfile(examples.image_path("dcmqi_ct3slice"), root / "imagesTr" / "dcmqi_0000.nii.gz")
    data = examples.label_path("dcmqi_ct3slice").read_bytes()
    (root / "labelsTr" / "dcmqi.nii.gz").write_bytes(data[: len(data) // 2])
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": 1, "file_ending": ".nii.gz"}))
    only_problem(root, root / "labelsTr" / "dcmqi.nii.gz", "truncated")


def test_unreadable_file(ds):
    path = ds / "labelsTr" / "a.nii.gz"
    path.write_bytes(b"this is not an image")
    only_problem(ds, path, "cannot read the image header", "re-export")


def test_shape_mismatch(ds):
    path = ds / "labelsTr" / "a.nii.gz"
    write_image(path, np.zeros((6, 7, 9), np.uint8), Geometry((6, 7, 9), GEOM.spacing, GEOM.origin, EYE))
    only_problem(ds, path, "shape (6, 7, 9)", "(6, 7, 8)", "a_0000.nii.gz")


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("spacing", (2.5, 0.75, 0.76), "spacing"),
        ("origin", (-10.0, 20.0, -29.5), "origin"),
        ("direction", (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0), "direction"),
    ],
)
def test_geometry_mismatch(ds, field, value, fragment):
    path = ds / "labelsTr" / "b.nii.gz"
    geom = Geometry(**{**GEOM.__dict__, field: value})
    write_image(path, _label(), geom)
    only_problem(ds, path, f"{fragment} ", "differs from", "b_0000.nii.gz", "resample")


def test_geometry_tolerances(ds):
    path = ds / "labelsTr" / "b.nii.gz"
    write_image(path, _label(), Geometry(GEOM.shape, (2.5, 0.75, 0.7504), (-10.0, 20.001, -30.0), EYE))
    assert problems_of(ds) == []  # within rtol 1e-3 and 0.01 mm
    only_problem(ds, path, "origin", origin_atol_mm=1e-4)
    only_problem(ds, path, "spacing", spacing_rtol=1e-5, origin_atol_mm=1.0)


def test_undeclared_label_values(ds):
    path = ds / "labelsTr" / "a.nii.gz"
    label = _label()
    label[0, 0, 0], label[0, 0, 1] = 3, 7
    write_image(path, label, GEOM)
    only_problem(ds, path, "label values [3, 7] are not declared")


def test_non_integer_float_label(ds):
    path = ds / "labelsTr" / "a.nii.gz"
    write_image(path, _label().astype(np.float32) * 0.5, GEOM)
    only_problem(ds, path, "non-integer values")
    write_image(path, _label().astype(np.float32), GEOM)  # integral floats are fine
    assert problems_of(ds) == []


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_voxels(ds, bad):
    path = ds / "imagesTr" / "b_0000.nii.gz"
    image = _image().astype(np.float32)
    image[1, 2, 3] = bad
    image[4, 5, 6] = -bad
    write_image(path, image, GEOM)
    only_problem(ds, path, "2 NaN/Inf voxels")


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda: sitk.GetImageFromArray(np.zeros((7, 8), np.int16)), "is a 2D image"),
        (lambda: sitk.JoinSeries([sitk.GetImageFromArray(np.zeros(GEOM.shape, np.int16))] * 2), "is a 4D image"),
        (lambda: sitk.GetImageFromArray(np.zeros((*GEOM.shape, 2), np.int16), isVector=True), "several components per voxel"),
    ],
)
def test_not_3d_or_multichannel_image(ds, make, fragment):
    path = ds / "imagesTr" / "a_0000.nii.gz"
    sitk.WriteImage(make(), str(path))
    only_problem(ds, path, fragment)


def _patch_nifti_pixdim(path: Path, axis: int, value: float) -> None:
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[76 + 4 * (axis + 1) : 80 + 4 * (axis + 1)] = struct.pack("<f", value)
    path.write_bytes(gzip.compress(bytes(raw)))


@pytest.mark.parametrize("value", [0.0, -2.5, float("nan")])
def test_bad_spacing(ds, value):
    path = ds / "imagesTr" / "a_0000.nii.gz"
    _patch_nifti_pixdim(path, 2, value)  # z voxel size
    if value != -2.5:
        assert read_header(path)[0].spacing[0] == 1.0  # what ITK makes of it: silently 1 mm
    problem = only_problem(ds, path, "zero, negative or NaN")
    assert str(value) in problem


def test_implausible_spacing_is_reported_from_the_voxel_read(ds):
    path = ds / "imagesTr" / "a_0000.nii.gz"
    _patch_nifti_pixdim(path, 2, 1e-38)  # positive, so the header check passes it; the NIfTI check does not
    only_problem(ds, path, "pixdim[3]", "voxel size")


def test_invalid_nifti_header_is_reported_not_skipped(ds):
    path = ds / "imagesTr" / "b_0000.nii.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[:4] = struct.pack("<i", 0)  # sizeof_hdr: ITK still reads the file
    path.write_bytes(gzip.compress(bytes(raw[: len(raw) // 2])))  # and half of it is missing
    assert read_header(path)[0] == GEOM
    only_problem(ds, path, "not a valid NIfTI header", "sizeof_hdr is 0")


def test_empty_dataset(tmp_path):
    (tmp_path / "Dataset001_Empty").mkdir()
    root = make_dataset(tmp_path / "Dataset001_Empty", cases=(), test=())
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    only_problem(root, root, "no training cases")


def test_paths_escaping_the_dataset_are_reported_and_not_read(ds, tmp_path):
    outside = tmp_path / "secret.nii.gz"
    outside.write_bytes(b"never read")
    dj = json.loads((ds / "dataset.json").read_text())
    dj["dataset"] = {
        "a": {"images": ["imagesTr/a_0000.nii.gz"], "label": "labelsTr/a.nii.gz"},
        "b": {"images": ["../secret.nii.gz"], "label": "labelsTr/b.nii.gz"},
    }
    (ds / "dataset.json").write_text(json.dumps(dj))
    problems = problems_of(ds)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{ds / 'dataset.json'}: case b image \"../secret.nii.gz\" lies outside")


def test_multichannel_dataset_channel_mismatch(tmp_path):
    root = make_dataset(tmp_path / "Dataset003_Two", channels=2)
    assert problems_of(root) == []
    path = root / "imagesTr" / "a_0001.nii.gz"
    write_image(path, _image(), Geometry(GEOM.shape, GEOM.spacing, (0.0, 0.0, 0.0), EYE))
    only_problem(root, path, "origin", "a_0000.nii.gz")


def test_test_images_are_checked(ds):
    path = ds / "imagesTs" / "t_0000.nii.gz"
    image = _image().astype(np.float32)
    image[0, 0, 0] = np.nan
    write_image(path, image, GEOM)
    only_problem(ds, path, "1 NaN/Inf voxels")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    only_problem(ds, path, "truncated")


def test_every_problem_is_reported_at_once(ds):
    shutil.copyfile(ds / "labelsTr" / "a.nii.gz", ds / "labelsTr" / "zz.nii.gz")  # extra label
    (ds / "imagesTr" / "a_0000.nii.gz").write_bytes(b"junk")  # unreadable image
    label = _label()
    label[0, 0, 0] = 9
    write_image(ds / "labelsTr" / "b.nii.gz", label, Geometry(GEOM.shape, GEOM.spacing, (0.0, 0.0, 0.0), EYE))  # origin + value
    image = _image().astype(np.float32)
    image[0, 0, 0] = np.inf
    write_image(ds / "imagesTs" / "t_0000.nii.gz", image, GEOM)  # test image with Inf
    expected = [
        ("labelsTr/zz.nii.gz", "label without an image"),
        ("imagesTr/a_0000.nii.gz", "cannot read the image header"),
        ("labelsTr/b.nii.gz", "origin"),
        ("labelsTr/b.nii.gz", "label values [9]"),
        ("imagesTs/t_0000.nii.gz", "1 NaN/Inf voxels"),
    ]
    problems = problems_of(ds)
    assert len(problems) == len(expected), problems
    for rel, fragment in expected:
        assert any(p.startswith(f"{ds / rel}: ") and fragment in p for p in problems), (rel, fragment, problems)
    _, parallel = validate_dataset(ds, n_jobs=2, progress=False)
    assert parallel == problems


def test_bad_arguments(ds):
    with pytest.raises(ValueError, match="n_jobs"):
        validate_dataset(ds, n_jobs=0)
    with pytest.raises(ValueError, match="origin_atol_mm"):
        validate_dataset(ds, origin_atol_mm=float("nan"))
    dataset, problems = validate_dataset(ds.parent / "missing", progress=False)
    assert dataset is None and "no such dataset folder" in problems[0]


def test_symlinked_files_are_checked(ds, tmp_path):
    # Files symlinked in from elsewhere are part of the dataset: they are read and checked.
    store = tmp_path / "store"
    store.mkdir()
    target = store / "a_label.nii.gz"
    label = _label()
    label[0, 0, 0] = 5
    write_image(target, label, GEOM)
    link = ds / "labelsTr" / "a.nii.gz"
    link.unlink()
    link.symlink_to(target)
    only_problem(ds, link, "label values [5]")
