"""MetaImage and NRRD headers are checked before ITK sees them: a header ITK would crash on,
allocate billions of voxels for, or read a file elsewhere on the machine through is refused with
a message naming the file; good files written by SimpleITK still read."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from autoliver.core.errors import ImageReadError
from autoliver.io.images import read_header, read_image

META = "ObjectType = Image\nNDims = {ndims}\nDimSize = {sizes}\nElementSpacing = {spacing}\nElementType = MET_SHORT\nElementDataFile = {data}\n"


def meta(tmp_path, name="x.mha", ndims=3, sizes="4 5 6", spacing="1 1 2", data="LOCAL", payload=None):
    path = tmp_path / name
    n = int(np.prod([int(v) for v in sizes.split()])) if payload is None else 0
    path.write_bytes(META.format(ndims=ndims, sizes=sizes, spacing=spacing, data=data).encode() + (payload if payload is not None else b"\0\0" * n))
    return path


def test_good_files_written_by_sitk_still_read(tmp_path):
    image = sitk.GetImageFromArray(np.arange(120, dtype=np.int16).reshape(6, 5, 4))
    image.SetSpacing((0.7, 0.7, 2.5))
    for name in ("a.mha", "b.mhd", "c.nrrd", "d.nhdr"):
        sitk.WriteImage(image, str(tmp_path / name))
        array, geometry = read_image(tmp_path / name)
        assert np.array_equal(array, np.arange(120).reshape(6, 5, 4)) and geometry.spacing == pytest.approx((2.5, 0.7, 0.7))


@pytest.mark.parametrize("kwargs, words", [
    ({"ndims": 100, "sizes": " ".join(["2"] * 100)}, "100 dimensions"),
    ({"sizes": "4 5"}, "2 sizes for 3 dimensions"),
    ({"sizes": "4 0 6"}, "size below 1"),
    ({"sizes": "4 five 6", "payload": b""}, "not a list of integers"),
    ({"sizes": "100000 100000 100000", "payload": b""}, "voxels, more than"),
    ({"spacing": "1 nan 2"}, "non-finite voxel size"),
    ({"spacing": "1 0 2"}, "zero, negative"),
    ({"data": "/etc/hostname", "name": "x.mhd", "payload": b""}, "outside the header's folder"),
    ({"data": "../secret.raw", "name": "x.mhd", "payload": b""}, "outside the header's folder"),
    ({"data": "missing.raw", "name": "x.mhd", "payload": b""}, "missing beside the header"),
    ({"data": "slice%03d.raw 0 3 1", "name": "x.mhd", "payload": b""}, "list or pattern"),
])
def test_hostile_metaimage_headers_are_refused(tmp_path, kwargs, words):
    path = meta(tmp_path, **kwargs)
    for reader in (read_image, read_header):
        with pytest.raises(ImageReadError, match=words) as err:
            reader(path)
        assert str(path) in str(err.value)


def test_ndims_100_no_longer_kills_the_process(tmp_path):
    path = meta(tmp_path, ndims=100, sizes=" ".join(["2"] * 100))
    code = f"from autoliver.io.images import read_image\ntry:\n    read_image({str(path)!r})\nexcept Exception as e:\n    print(type(e).__name__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ImageReadError" in result.stdout


@pytest.mark.parametrize("header, words", [
    ("NRRD0004\ntype: short\ndimension: 3\nsizes: 4 5 6\nencoding: raw\ndata file: /etc/passwd\n\n", "outside the header's folder"),
    ("NRRD0004\ntype: short\ndimension: 3\nsizes: 4 5 6\nencoding: raw\ndatafile: ../x.raw\n\n", "outside the header's folder"),
    ("NRRD0004\ntype: short\ndimension: 9\nsizes: 1 1 1 1 1 1 1 1 1\nencoding: raw\n\n", "9 dimensions"),
    ("NRRD0004\ntype: short\ndimension: 3\nsizes: 50000 50000 50000\nencoding: raw\n\n", "voxels, more than"),
    ("NRRD0004\ntype: short\ndimension: 3\nsizes: 4 5 6\nspacings: 1 -1 1\nencoding: raw\n\n", "zero, negative"),
    ("P5 not an nrrd\n", "not a NRRD file"),
])
def test_hostile_nrrd_headers_are_refused(tmp_path, header, words):
    path = tmp_path / "x.nhdr"
    path.write_text(header)
    with pytest.raises(ImageReadError, match=words):
        read_image(path)
