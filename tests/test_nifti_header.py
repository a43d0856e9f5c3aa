"""NIfTI headers ITK reads without complaint but wrongly: each refused with an ImageReadError
naming the file and the field, on every path that reads voxels (read_image, the prediction
input read_checked_image, validate_dataset), while valid files (the shipped examples, either
byte order, NIfTI-2) pass with the same spacing and NaN counts as before."""

from __future__ import annotations

import gzip
import json
import math
import struct
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from autoliver import examples
from autoliver.core.errors import ImageReadError
from autoliver.io import nifti_raw
from autoliver.io.images import Geometry, read_image, write_image
from autoliver.io.validate import read_checked_image, validate_dataset

EYE = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
GEOM = Geometry((6, 7, 8), (2.5, 0.75, 0.75), (-10.0, 20.0, -30.0), EYE)
SUFFIXES = [".nii", ".nii.gz"]

# Measured with the hand-written struct parser this module replaced: (x, y, z) pixdim of every shipped example.
EXAMPLE_SPACING = {
    "chaos_ct_sample": (0.7265625, 0.7265625, 2.0),
    "dcmqi_ct3slice": (0.8105469942092896, 0.8105469942092896, 1.0),
    "lits117_128cube": (1.0, 1.0, 1.0),
    "totalseg_example_ct_full": (3.0, 3.0, 3.0),
    "totalseg_example_ct_sm": (3.0, 3.0, 3.0),
    "totalseg_example_dicom20": (0.9765625, 0.9765625, 2.0),
}


def _volume(dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(0).normal(0, 300, GEOM.shape).astype(dtype)


def _raw(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.endswith(".gz") else data


def _write_raw(path: Path, raw: bytes) -> None:
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)


def patch_header(path: Path, **fields) -> Path:
    """Set header fields through nibabel's view of the raw header (check=False: nothing is fixed)."""
    raw = _raw(path)
    cls = nib.Nifti2Header if nib.Nifti2Header.may_contain_header(raw[:540]) else nib.Nifti1Header
    header = cls(raw[: cls.sizeof_hdr], check=False)
    for key, value in fields.items():
        header[key] = value
    _write_raw(path, header.binaryblock + raw[cls.sizeof_hdr :])
    return path


def make(tmp_path: Path, suffix: str = ".nii.gz", array: np.ndarray | None = None, name: str = "vol", **fields) -> Path:
    path = tmp_path / f"{name}{suffix}"
    write_image(path, _volume() if array is None else array, GEOM)
    return patch_header(path, **fields) if fields else path


def assert_refused(path: Path, *fragments: str, readers=(nifti_raw.check_nifti_complete, read_image)) -> str:
    """Every reader refuses ``path`` with an ImageReadError naming it and holding ``fragments``;
    so does the prediction input reader, whose header checks may word it first (e.g. ITK's
    "cannot read the image header" for 8 dimensions)."""
    message = ""
    for reader in (*readers, read_checked_image):
        with pytest.raises(ImageReadError) as err:
            reader(path)
        assert err.value.problems and all(p.startswith(f"{path}: ") for p in err.value.problems), err.value.problems
        if reader is not read_checked_image:
            message = str(err.value)
            for fragment in fragments:
                assert fragment in message, message
    return message


# ---------------------------------------------------------------- valid files: unchanged results

@pytest.mark.parametrize("case", sorted(EXAMPLE_SPACING))
def test_shipped_examples_pass_with_the_same_spacing_and_nan_count(case, tmp_path):
    for path in (examples.image_path(case), examples.label_path(case)):
        plain = tmp_path / path.name.removesuffix(".gz")
        plain.write_bytes(gzip.decompress(path.read_bytes()))
        for p in (path, plain):
            nifti_raw.check_nifti_complete(p)
            assert nifti_raw.nifti_header_spacing(p) == EXAMPLE_SPACING[case]
            assert nifti_raw.nifti_nonfinite_count(p) is None  # int16 CT / uint8 labels: no NaN possible
            parsed = nifti_raw.check_nifti_header(p)
            assert parsed.version == 1 and parsed.offset == 352 and len(parsed.shape) == 3
            assert parsed.n_bytes == len(plain.read_bytes())


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("endianness", ["<", ">"])
@pytest.mark.parametrize("version", [1, 2])
def test_nibabel_written_files_in_either_byte_order_and_nifti2_pass(tmp_path, suffix, endianness, version):
    data = np.arange(8 * 7 * 6, dtype=np.float32).reshape(8, 7, 6)  # (x, y, z)
    data[1, 2, 3], data[4, 5, 0], data[7, 6, 5] = np.nan, np.inf, -np.inf
    affine = np.diag([0.75, 0.8, 2.5, 1.0])
    image_cls, header_cls = (nib.Nifti1Image, nib.Nifti1Header) if version == 1 else (nib.Nifti2Image, nib.Nifti2Header)
    image = image_cls(data, affine, header_cls(endianness=endianness))
    path = tmp_path / f"vol{suffix}"
    image.to_filename(path)
    assert nifti_raw.check_nifti_header(path).header.endianness == endianness
    nifti_raw.check_nifti_complete(path)
    assert nifti_raw.nifti_header_spacing(path) == pytest.approx((0.75, 0.8, 2.5))
    assert nifti_raw.nifti_nonfinite_count(path) == 3
    assert nifti_raw.nifti_nonfinite_count(path, chunk_bytes=12) == 3
    if version == 1:  # the NIfTI-2 test only needs our parser; ITK reads NIfTI-1 in both orders
        array, geom = read_image(path)
        assert array.shape == (6, 7, 8) and geom.spacing == pytest.approx((2.5, 0.8, 0.75))


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_truncated_nifti2_is_detected(tmp_path, suffix):
    path = tmp_path / f"vol{suffix}"
    nib.Nifti2Image(np.zeros((8, 7, 6), np.int16), np.eye(4)).to_filename(path)
    _write_raw(path, _raw(path)[:-100])
    with pytest.raises(ImageReadError, match="truncated: holds"):
        nifti_raw.check_nifti_complete(path)


# ---------------------------------------------------------------- sizeof_hdr and magic

@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("sizeof_hdr", [0, 349, -348])
def test_wrong_sizeof_hdr_is_refused(tmp_path, suffix, sizeof_hdr):
    # ITK reads such a file as if nothing were wrong; before, every check was skipped for it.
    path = make(tmp_path, suffix, sizeof_hdr=sizeof_hdr)
    assert sitk.ReadImage(str(path)).GetSize() == (8, 7, 6)
    assert nifti_raw.nifti_header_spacing(path) is None
    assert_refused(path, "not a valid NIfTI header", f"sizeof_hdr is {sizeof_hdr}")


def test_nifti1_layout_claiming_nifti2_size_is_refused(tmp_path):
    path = make(tmp_path, ".nii", sizeof_hdr=540)  # read as NIfTI-2, its magic is where NIfTI-1 keeps other fields
    assert_refused(path, "not a valid NIfTI header", "magic is")


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_byte_swapped_garbage_and_short_files_are_refused(tmp_path, suffix):
    path = make(tmp_path, suffix)
    raw = bytearray(_raw(path))
    raw[:4] = struct.pack(">i", 349)
    _write_raw(path, bytes(raw))
    assert_refused(path, "not a valid NIfTI header")
    _write_raw(path, b"\x5c\x01\x00\x00 not a header")  # starts like one, too short
    assert_refused(path, "not a valid NIfTI header", "only 17 bytes")


@pytest.mark.parametrize("magic, fragment", [(b"abc", "magic is b'abc'"), (b"ni1", ".hdr/.img pair"), (b"", "magic is b''")])
def test_bad_magic_is_refused(tmp_path, magic, fragment):
    path = make(tmp_path, ".nii", magic=magic)  # ITK would read it as a deprecated ANALYZE file (origin lost)
    assert_refused(path, "not a valid NIfTI header", fragment)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_the_reported_holes_behind_a_bad_sizeof_hdr_are_closed(tmp_path, suffix):
    """A bad sizeof_hdr hid each of these from every check (ITK reads them all)."""
    # a half-truncated file
    half = make(tmp_path, suffix, name="half")
    raw = _raw(half)
    _write_raw(half, raw[: len(raw) // 2])
    patch_header(half, sizeof_hdr=0)
    assert_refused(half, "not a valid NIfTI header")
    # an all-NaN image (ITK reads NaN as 0)
    nan = make(tmp_path, suffix, np.full(GEOM.shape, np.nan, np.float32), name="nan", sizeof_hdr=0)
    assert np.all(sitk.GetArrayFromImage(sitk.ReadImage(str(nan))) == 0)
    assert_refused(nan, "not a valid NIfTI header")
    # a NaN voxel size (ITK makes it 1.0 mm)
    pixdim = make(tmp_path, suffix, name="pixdim", sizeof_hdr=0, pixdim=[1.0, 0.75, 0.75, np.nan, 1, 1, 1, 1])
    assert sitk.ReadImage(str(pixdim)).GetSpacing()[2] == 1.0
    assert_refused(pixdim, "not a valid NIfTI header")
    # 207 slices declared in a 6-slice file (ITK pads with zeros)
    slices = make(tmp_path, suffix, name="slices", sizeof_hdr=0, dim=[3, 8, 7, 207, 1, 1, 1, 1])
    assert sitk.ReadImage(str(slices)).GetSize() == (8, 7, 207)
    assert_refused(slices, "not a valid NIfTI header")


# ---------------------------------------------------------------- vox_offset

@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("offset", [math.inf, -math.inf, math.nan, -352.0, 352.5, 1e30, 2.0**31])
def test_bad_vox_offset_is_refused(tmp_path, suffix, offset):
    # before: OverflowError / ValueError tracebacks from int(vox_offset)
    path = make(tmp_path, suffix, vox_offset=offset)
    assert_refused(path, "vox_offset", f"is {float(np.float32(offset))!r}")


def test_bad_nifti2_vox_offset_is_refused(tmp_path):
    path = tmp_path / "vol.nii"
    nib.Nifti2Image(np.zeros((8, 7, 6), np.int16), np.eye(4)).to_filename(path)
    patch_header(path, vox_offset=-1)
    assert_refused(path, "vox_offset", readers=(nifti_raw.check_nifti_complete,))
    patch_header(path, vox_offset=2**40)
    assert_refused(path, "vox_offset", readers=(nifti_raw.check_nifti_complete,))


def test_small_vox_offset_is_refused_unless_the_voxels_follow_the_header(tmp_path):
    path = make(tmp_path, ".nii", vox_offset=0.0)  # voxels at byte 352: ITK would read them from 348
    assert nifti_raw.check_nifti_header(path).offset == 348
    assert_refused(path, "lies inside the header")
    raw = path.read_bytes()
    path.write_bytes(raw[:348] + raw[352:])  # the voxels right after the header: unambiguous
    nifti_raw.check_nifti_complete(path)


# ---------------------------------------------------------------- voxel size and transforms

@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("axis", [1, 3])
@pytest.mark.parametrize("value", [math.nan, 0.0, -2.5, 1e-38, math.inf, 1e30])
def test_bad_pixdim_is_refused(tmp_path, suffix, axis, value):
    pixdim = [1.0, 0.75, 0.75, 2.5, 1, 1, 1, 1]
    pixdim[axis] = value
    path = make(tmp_path, suffix, pixdim=pixdim)
    message = assert_refused(path, f"pixdim[{axis}]", "voxel size")
    assert repr(float(np.float32(value))) in message


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("field, value", [
    ("qoffset_x", math.nan), ("qoffset_z", math.inf), ("quatern_b", math.nan), ("quatern_d", -math.inf),
    ("srow_x", [0.75, 0.0, math.nan, 1.0]), ("srow_z", [0.0, 0.0, 2.5, math.inf]),
])
def test_non_finite_origin_or_direction_is_refused(tmp_path, suffix, field, value):
    path = make(tmp_path, suffix, **{field: value})
    assert_refused(path, field, "origin/direction", "not finite")


def test_non_finite_values_in_an_unused_transform_are_ignored_as_by_itk(tmp_path):
    path = make(tmp_path, ".nii", sform_code=0, srow_x=[math.nan] * 4)
    nifti_raw.check_nifti_complete(path)
    np.testing.assert_array_equal(read_image(path)[0], _volume())


def test_every_bad_field_is_listed(tmp_path):
    path = make(tmp_path, ".nii", pixdim=[1.0, 0.0, 0.75, math.nan, 1, 1, 1, 1], qoffset_y=math.nan)
    with pytest.raises(ImageReadError) as err:
        nifti_raw.check_nifti_complete(path)
    assert [p.split(": ")[1].split(" ")[0] for p in err.value.problems] == ["pixdim[1]", "pixdim[3]", "qoffset_y"]


# ---------------------------------------------------------------- declared size

@pytest.mark.parametrize("dim, fragment", [
    ([0, 8, 7, 6, 1, 1, 1, 1], "dim[0] (number of dimensions) is 0"),
    ([8, 8, 7, 6, 1, 1, 1, 1], "dim[0] (number of dimensions) is 8"),
    ([-3, 8, 7, 6, 1, 1, 1, 1], "dim[0] (number of dimensions) is -3"),
    ([3, 8, 0, 6, 1, 1, 1, 1], "dimension sizes (8, 0, 6)"),
    ([3, 8, 7, -6, 1, 1, 1, 1], "dimension sizes (8, 7, -6)"),
    ([3, 2048, 2048, 1024, 1, 1, 1, 1], "2048 x 2048 x 1024 = 4294967296 voxels (16.0 GiB)"),
    ([7, 32767, 32767, 32767, 2, 2, 2, 2], "voxels"),
])
def test_impossible_sizes_are_refused_before_any_allocation(tmp_path, dim, fragment):
    path = make(tmp_path, ".nii.gz", dim=dim)
    tracemalloc.start()
    try:
        assert_refused(path, fragment)  # ITK itself tries to allocate 16 GiB for the 2**32 voxels
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_unknown_datatype_is_refused(tmp_path):
    assert_refused(make(tmp_path, ".nii", datatype=999), "datatype code 999")
    assert_refused(make(tmp_path, ".nii", datatype=0), "datatype code 0")


# ---------------------------------------------------------------- validate reports them with the others

def test_validate_reports_each_refused_file_and_goes_on(tmp_path):
    root = tmp_path / "Dataset001_Headers"
    label = np.zeros(GEOM.shape, np.uint8)
    label[2:4, 2:5, 2:6] = 1
    bad = {"sizeof": dict(sizeof_hdr=0), "offset": dict(vox_offset=math.inf), "tiny": dict(pixdim=[1.0, 0.75, 0.75, 1e-38, 1, 1, 1, 1]),
           "sform": dict(srow_y=[0.0, math.nan, 0.0, 20.0]), "big": dict(dim=[3, 2048, 2048, 1024, 1, 1, 1, 1])}
    for case in ("ok", *bad):
        make(root / "imagesTr", ".nii.gz", _volume(np.int16), name=f"{case}_0000", **bad.get(case, {}))
        write_image(root / "labelsTr" / f"{case}.nii.gz", label, GEOM)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1},
                                                   "numTraining": 1 + len(bad), "file_ending": ".nii.gz"}))
    _, problems = validate_dataset(root, progress=False)
    by_case = {p.split("imagesTr/")[1].split("_0000")[0]: p for p in problems if "imagesTr/" in p}
    assert set(by_case) == set(bad), problems
    assert "not a valid NIfTI header" in by_case["sizeof"]
    assert "vox_offset" in by_case["offset"]
    assert "pixdim[3]" in by_case["tiny"]
    assert "srow_y" in by_case["sform"]
    assert "4294967296 voxels" in by_case["big"] or "cannot read the image header" in by_case["big"]


@pytest.mark.parametrize("slope", [1e-38, -1e-35, 1e35])
def test_scaling_slope_readers_disagree_on_is_refused(tmp_path, slope):
    """Fuzzing found scl_slope 1e-38: ITK ignored it (voxel 217), nibabel applied it (2.17e-36)."""
    assert_refused(make(tmp_path, ".nii", scl_slope=slope, scl_inter=0.0), "scl_slope")
