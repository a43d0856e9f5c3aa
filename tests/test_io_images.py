"""Image I/O: exact round trips, DICOM series (order from headers, several series), atomic writes."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from autoliver import examples
from autoliver.core.errors import ImageReadError
from autoliver.io import images, nifti_raw
from autoliver.io.images import Geometry, dicom_series_files, read_header, read_image, write_image

DICOM20 = examples.DICOM_DIR / "totalseg_example_dicom20"
DICOM3 = examples.DICOM_DIR / "dcmqi_ct3slice"

OBLIQUE = tuple(float(v) for v in Rotation.from_euler("xyz", [10, -20, 35], degrees=True).as_matrix().ravel())
GEOMETRY = Geometry(shape=(5, 6, 7), spacing=(2.5, 0.7, 0.8), origin=(-100.25, 20.125, -300.3), direction=OBLIQUE)


def _volume(dtype) -> np.ndarray:
    rng = np.random.default_rng(0)
    if np.issubdtype(dtype, np.floating):
        return rng.normal(0, 300, GEOMETRY.shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -1024), min(info.max, 3000), GEOMETRY.shape, endpoint=True).astype(dtype)


def _assert_geometry_close(got: Geometry, want: Geometry, atol: float) -> None:
    assert got.shape == want.shape
    np.testing.assert_allclose(got.spacing, want.spacing, rtol=0, atol=atol)
    np.testing.assert_allclose(got.origin, want.origin, rtol=0, atol=atol * 100)  # |origin| ~ 300 mm
    np.testing.assert_allclose(got.direction, want.direction, rtol=0, atol=atol)


@pytest.mark.parametrize("suffix", [".mha", ".mhd", ".nrrd", ".nhdr", ".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
def test_round_trip_keeps_voxels_and_geometry(tmp_path, suffix, dtype):
    array = _volume(dtype)
    path = tmp_path / f"vol{suffix}"
    write_image(path, array, GEOMETRY)
    back, geom = read_image(path)
    assert back.dtype == array.dtype
    np.testing.assert_array_equal(back, array)
    if suffix in (".mha", ".mhd"):
        assert geom == GEOMETRY  # MetaImage stores doubles as text: exact
    elif suffix in (".nrrd", ".nhdr"):
        _assert_geometry_close(geom, GEOMETRY, atol=1e-12)
    else:  # NIfTI stores float32 spacing/origin and a float32 quaternion
        _assert_geometry_close(geom, GEOMETRY, atol=1e-6)
    header_geom, dim, pixel_type = read_header(path)
    assert (header_geom, dim) == (geom, 3)
    assert pixel_type == sitk.GetPixelIDValueAsString(sitk.GetImageFromArray(array).GetPixelID())
    # Only the image (and, for detached formats, its data file) is left: no temporary file.
    assert all(not p.name.startswith(".") for p in tmp_path.iterdir())


def test_read_dtype_cast_and_geometry_json_round_trip(tmp_path):
    path = tmp_path / "vol.mha"
    write_image(path, _volume(np.int16), GEOMETRY)
    array, geom = read_image(path, dtype=np.float32)
    assert array.dtype == np.float32
    assert Geometry.from_json(geom.to_json()) == geom


def test_dicom_series_matches_its_nifti_conversion():
    dicom, dgeom = read_image(DICOM20)
    nifti, ngeom = read_image(examples.image_path("totalseg_example_dicom20"))
    assert dicom.shape == (20, 512, 512)
    np.testing.assert_array_equal(dicom, nifti)
    assert dgeom == ngeom  # exactly, origin and spacing included


def test_dcmqi_dicom_matches_nifti_within_float32():
    # The 3-slice series reads as int32 (rescale slope/intercept); the NIfTI holds int16 and
    # float32 header values, so geometry agrees to float32 precision only.
    dicom, dgeom = read_image(DICOM3)
    nifti, ngeom = read_image(examples.image_path("dcmqi_ct3slice"))
    np.testing.assert_array_equal(dicom, nifti.astype(dicom.dtype))
    assert dicom.min() == -3024
    _assert_geometry_close(dgeom, ngeom, atol=1e-5)


def test_dicom_slice_order_comes_from_headers(tmp_path):
    reference, ref_geom = read_image(DICOM20)
    files = sorted(DICOM20.iterdir())
    order = np.random.default_rng(7).permutation(len(files))
    # New names sort in an order unrelated to the slice positions.
    for new_index, old_index in enumerate(order):
        shutil.copyfile(files[old_index], tmp_path / f"slice_{new_index:02d}.dcm")
    array, geom = read_image(tmp_path)
    np.testing.assert_array_equal(array, reference)
    assert geom == ref_geom
    names_by_position = [p.split("/")[-1] for p in dicom_series_files(tmp_path)]
    assert names_by_position != sorted(names_by_position)


def test_folder_with_two_series_is_an_error_listing_both(tmp_path):
    for src in (DICOM20, DICOM3):
        for f in src.iterdir():
            shutil.copyfile(f, tmp_path / f"{src.name}_{f.name}")
    uids = {next(iter(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(d)))) for d in (DICOM20, DICOM3)}
    assert len(uids) == 2
    with pytest.raises(ImageReadError) as err:
        read_image(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "2 DICOM series" in message
    for uid in uids:
        assert uid in message
    for src in (DICOM20, DICOM3):
        uid = next(iter(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(src))))
        picked, geom = read_image(tmp_path, series_uid=uid)
        expected, expected_geom = read_image(src)
        np.testing.assert_array_equal(picked, expected)
        assert geom == expected_geom
    with pytest.raises(ImageReadError, match="not found"):
        read_image(tmp_path, series_uid="1.2.3.4")


def test_folder_without_dicom_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(ImageReadError, match="no DICOM series"):
        read_image(tmp_path)


def test_unreadable_inputs_raise_naming_the_file(tmp_path):
    missing = tmp_path / "missing.nii.gz"
    for call in (read_image, read_header):
        with pytest.raises(ImageReadError, match="missing.nii.gz: file not found"):
            call(missing)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"not an image at all" * 10)
    for call in (read_image, read_header):
        with pytest.raises(ImageReadError, match="garbage.nii.gz"):
            call(garbage)
    truncated = tmp_path / "truncated.nii.gz"
    data = examples.image_path("dcmqi_ct3slice").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated.nii.gz.*truncated"):
        read_image(truncated)


@pytest.mark.parametrize(
    "make, dim",
    [
        (lambda: sitk.GetImageFromArray(np.zeros((6, 7), np.int16)), 2),
        (lambda: sitk.JoinSeries([sitk.GetImageFromArray(np.zeros((4, 6, 7), np.int16))] * 2), 4),
        (lambda: sitk.GetImageFromArray(np.zeros((4, 6, 7, 2), np.int16), isVector=True), 3),
    ],
)
def test_read_image_rejects_non_3d_and_multichannel(tmp_path, make, dim):
    path = tmp_path / "odd.nii.gz"
    sitk.WriteImage(make(), str(path))
    with pytest.raises(ImageReadError, match="odd.nii.gz: is a"):
        read_image(path)
    assert read_header(path)[1] == dim


def test_write_image_shape_mismatch_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="does not match"):
        write_image(tmp_path / "x.nii.gz", np.zeros((2, 2, 2), np.int16), GEOMETRY)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".nii.gz", ".mhd"])
def test_failed_write_leaves_old_file_intact(tmp_path, monkeypatch, suffix):
    path = tmp_path / f"vol{suffix}"
    old = _volume(np.int16)
    write_image(path, old, GEOMETRY)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def failing_write(image, filename, *args):
        with open(filename, "wb") as f:  # half a file, then the disk "fills up"
            f.write(b"\x00" * 100)
        raise RuntimeError("No space left on device")

    monkeypatch.setattr(images.sitk, "WriteImage", failing_write)
    with pytest.raises(OSError, match="No space") as info:
        write_image(path, old + 1, GEOMETRY)
    assert info.value.filename == str(path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    np.testing.assert_array_equal(read_image(path)[0], old)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_nifti_is_detected(tmp_path, suffix, keep):
    # ITK itself reads a truncated NIfTI without complaint (missing voxels come back as 0).
    path = tmp_path / f"vol{suffix}"
    write_image(path, _volume(np.int16), GEOMETRY)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ImageReadError, match=f"vol{suffix.replace('.', '[.]')}: truncated"):
        read_image(path)


def test_multi_member_gzip_nifti_is_complete(tmp_path):
    import gzip

    raw = gzip.decompress(examples.label_path("dcmqi_ct3slice").read_bytes())
    path = tmp_path / "members.nii.gz"
    path.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    nifti_raw.check_nifti_complete(path)
    np.testing.assert_array_equal(read_image(path)[0], read_image(examples.label_path("dcmqi_ct3slice"))[0])


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_nan_and_inf_are_found_in_the_raw_voxels(tmp_path, suffix):
    path = tmp_path / f"vol{suffix}"
    array = _volume(np.float32)
    array[1, 2, 3], array[2, 3, 4], array[4, 5, 6] = np.nan, np.inf, -np.inf
    write_image(path, array, GEOMETRY)
    read_back = read_image(path)[0]
    # ITK's NIfTI reader turns them into 0 (if this starts failing, ITK changed: good news).
    assert np.isfinite(read_back).all() and read_back[1, 2, 3] == 0
    assert nifti_raw.nifti_nonfinite_count(path) == 3
    assert nifti_raw.nifti_nonfinite_count(path, chunk_bytes=64) == 3  # chunked scan agrees
    write_image(path, _volume(np.float32), GEOMETRY)
    assert nifti_raw.nifti_nonfinite_count(path) == 0
    write_image(path, _volume(np.int16), GEOMETRY)
    assert nifti_raw.nifti_nonfinite_count(path) is None  # integers cannot be NaN


def test_nifti_header_spacing_is_raw_pixdim(tmp_path):
    path = tmp_path / "vol.nii.gz"
    write_image(path, _volume(np.int16), GEOMETRY)
    np.testing.assert_allclose(nifti_raw.nifti_header_spacing(path), GEOMETRY.spacing[::-1], rtol=1e-6)
    assert nifti_raw.nifti_header_spacing(examples.image_path("chaos_ct_sample")) == (0.7265625, 0.7265625, 2.0)
    write_image(tmp_path / "vol.mha", _volume(np.int16), GEOMETRY)
    assert nifti_raw.nifti_header_spacing(tmp_path / "vol.mha") is None
