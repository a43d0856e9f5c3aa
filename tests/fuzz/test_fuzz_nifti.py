"""NIfTI-1 (.nii, .nii.gz) files with hostile header fields and truncated, extended or garbage data.

A valid volume is written by autoliver's own writer; its 348-byte header is then rewritten
field by field (sizeof_hdr, dim, datatype, bitpix, pixdim, vox_offset, scl_slope/inter,
qform/sform codes, quaternion, offsets, srow, magic, units) and its data cut, extended or
corrupted. The oracle: an untouched file reads back exactly; a NaN/Inf/out-of-range voxel size,
a used transform with NaN/Inf, or fewer voxel bytes than the header declares is refused; any
other file is refused or read as nibabel (an independent NIfTI reader) reads its voxels.
"""

from __future__ import annotations

import gzip
import math

import nibabel as nib
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from nibabel.nifti1 import Nifti1Header

from autoliver.io.images import write_image
from autoliver.io.validate import read_checked_image
from fuzz.conftest import scaled
from fuzz.counting import count
from fuzz.strategies import check_image, flip_byte, hostile_floats, hostile_ints, images, outcome, same_image, scratch

FLOAT_FIELDS = ("vox_offset", "scl_slope", "scl_inter", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z")
INT_FIELDS = ("sizeof_hdr", "datatype", "bitpix", "qform_code", "sform_code", "xyzt_units")
ARRAY_FIELDS = {"dim": 8, "pixdim": 8, "srow_x": 4, "srow_y": 4, "srow_z": 4}
ALL_FIELDS = FLOAT_FIELDS + INT_FIELDS + tuple(ARRAY_FIELDS) + ("magic",)
SHAPE_FIELDS = ("sizeof_hdr", "dim", "datatype", "bitpix", "vox_offset", "magic")  # change what the bytes mean


@st.composite
def field_edit(draw):
    field = draw(st.sampled_from(ALL_FIELDS))
    if field in FLOAT_FIELDS:
        value = draw(st.one_of(hostile_floats, st.integers(-400, 400).map(float)))
    elif field in INT_FIELDS:
        value = draw(st.one_of(hostile_ints, st.sampled_from((2, 4, 8, 16, 64, 348, 540, 0, 1, 10)))) if field not in ("qform_code", "sform_code") \
            else draw(st.integers(-2, 5))
    elif field == "magic":
        value = draw(st.sampled_from((b"n+1", b"ni1", b"n+2", b"xyz", b"")))
    else:
        index = draw(st.integers(0, ARRAY_FIELDS[field] - 1))
        element = draw(st.one_of(hostile_ints, st.integers(0, 8))) if field == "dim" else draw(st.one_of(hostile_floats, st.floats(-5, 5, allow_nan=False)))
        value = (index, element)
    return field, value


def _apply(header: Nifti1Header, field: str, value) -> None:
    if field in ARRAY_FIELDS:
        index, element = value
        values = np.array(header[field], dtype=np.float64 if field != "dim" else np.int64)
        if field == "dim":
            element = int(np.clip(element, -(2**15), 2**15 - 1))  # dim is int16 on disk
        values[index] = element
        header[field] = values
    elif field in INT_FIELDS:
        info = np.iinfo(header[field].dtype)  # the field's width on disk
        header[field] = int(np.clip(value, info.min, info.max))
    else:
        header[field] = value


operations = st.lists(st.one_of(
    st.tuples(st.just("field"), field_edit()),
    st.tuples(st.just("truncate"), st.floats(0, 0.999)),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("flip"), st.tuples(st.integers(0, 10**6), st.integers(1, 255))),
), min_size=0, max_size=3)


def _spatial_pixdim_bad(header: Nifti1Header) -> bool:
    ndim = int(header["dim"][0])
    if not 1 <= ndim <= 7:
        return False
    values = [float(v) for v in header["pixdim"][1 : min(ndim, 3) + 1]]
    return any(not (math.isfinite(v) and 1e-6 <= v <= 1e6) for v in values)


def _transform_bad(header: Nifti1Header) -> bool:
    fields = {"qform_code": ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z"), "sform_code": ("srow_x", "srow_y", "srow_z")}
    return any(int(header[code]) > 0 and not np.isfinite(np.concatenate([np.atleast_1d(np.asarray(header[f], np.float64)) for f in names])).all()
               for code, names in fields.items())


def _nibabel_voxels(path):
    """The voxels as nibabel reads them, (Z, Y, X); None where nibabel refuses the file."""
    try:
        image = nib.load(str(path))
        data = np.asarray(image.dataobj)
    except Exception:  # noqa: BLE001 - the reference reader may refuse what it likes
        return None
    if data.ndim != 3:
        return None
    return np.transpose(data, (2, 1, 0))


@settings(max_examples=scaled(500))
@given(image=images(), gz=st.booleans(), ops=operations)
def test_nifti_reader_refuses_or_reads_correctly(image, gz, ops):
    array, geometry = image
    with scratch() as folder:
        source = folder / "source.nii"
        write_image(source, array, geometry, compress=False)
        raw = source.read_bytes()
        header = Nifti1Header(raw[:348], check=False)
        body = raw[348:]
        data_len, meaning_changed, geometry_kept, raw_flip = len(body), False, True, False
        for op, arg in ops:
            if op == "field":
                _apply(header, *arg)
                meaning_changed |= arg[0] in SHAPE_FIELDS
                geometry_kept = False
            elif op == "truncate":
                body = body[: int(len(body) * arg)]
                raw_flip = True  # bytes appended later are other voxels
            elif op == "extend":
                body = body + arg
            elif op == "flip":
                body = flip_byte(body, *arg)
                raw_flip = True
        content = header.binaryblock + body
        path = folder / ("image.nii.gz" if gz else "image.nii")
        path.write_bytes(gzip.compress(content, mtime=0) if gz else content)
        result, error = outcome(read_checked_image, path)
        count("nifti")
        if not meaning_changed and (len(body) < data_len or _spatial_pixdim_bad(header) or _transform_bad(header)):
            assert error is not None, f"{path.name}: truncated data or a hostile header was read"
        if result is None:
            return
        got, _ = check_image(result)
        if not ops or (not meaning_changed and geometry_kept and not raw_flip):
            same_image(result, array, geometry)
        reference = _nibabel_voxels(path)
        if reference is not None and reference.shape == got.shape and np.isfinite(reference).all():
            np.testing.assert_allclose(got.astype(np.float64), reference.astype(np.float64), rtol=1e-5, atol=1e-6)


@settings(max_examples=scaled(60))
@given(image=images(), gz=st.booleans(), cut=st.integers(1, 4000), mask=st.integers(1, 255), where=st.integers(0, 10**6))
def test_damaged_gzip_stream_is_refused_or_read_correctly(image, gz, cut, mask, where):
    """A .nii.gz whose compressed stream is cut short or has a flipped byte: refused, or (a flip
    the gzip checksum cannot see) the same voxels."""
    array, geometry = image
    with scratch() as folder:
        path = folder / "image.nii.gz"
        write_image(path, array, geometry)
        data = path.read_bytes()
        path.write_bytes(data[: max(1, len(data) - cut)] if gz else flip_byte(data, where, mask))
        result, error = outcome(read_checked_image, path)
        count("nifti")
        if gz:
            assert error is not None, "a gzip stream cut short was read"
        elif result is not None:
            same_image(result, array, geometry)
