"""Shared strategies and the property every reader must keep.

The property (``outcome``): a public reader either returns a usable result or raises an
``AutoliverError`` whose message names the file; any other exception fails the test. A
returned image must be self-consistent (array shape = geometry shape, finite voxels, a voxel
size in range, finite origin, orthonormal direction) and, where the generated file has a known
meaning, equal to what was written (``same_image``).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

from autoliver.core.errors import AutoliverError
from autoliver.core.geometry import geometry_problems
from autoliver.io.images import Geometry

SPECIAL_FLOATS = (math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-38, -1.0, 1e38, 1e-300, 1e300)
DTYPES = (np.uint8, np.int16, np.int32, np.float32, np.float64)

special_floats = st.sampled_from(SPECIAL_FLOATS)
hostile_floats = st.one_of(special_floats, st.floats(allow_nan=True, allow_infinity=True, width=32))
hostile_ints = st.one_of(st.sampled_from((0, -1, 1, 2, 3, 4, 7, 8, 100, 2**15 - 1, -(2**15), 2**31 - 1, 2**31, 2**40, 2**63)),
                         st.integers(-(2**31), 2**31 - 1))


@st.composite
def rotations(draw) -> tuple[float, ...]:
    """A 3x3 direction (row-major): an axis permutation with signs, optionally tilted about z."""
    perm = draw(st.permutations(range(3)))
    signs = draw(st.lists(st.sampled_from((1.0, -1.0)), min_size=3, max_size=3))
    m = np.zeros((3, 3))
    for i, (p, s) in enumerate(zip(perm, signs)):
        m[i, p] = s
    angle = draw(st.sampled_from((0.0, 0.0, 0.3, -1.1)))
    c, s = math.cos(angle), math.sin(angle)
    m = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ m
    return tuple(float(v) for v in m.ravel())


@st.composite
def images(draw, dtypes=DTYPES, max_side: int = 6) -> tuple[np.ndarray, Geometry]:
    """A small valid (Z, Y, X) volume and its geometry."""
    shape = tuple(draw(st.integers(1, max_side)) for _ in range(3))
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if dtype.kind == "f":
        array = rng.normal(0, 300, shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        array = rng.integers(max(info.min, -2000), min(info.max, 3000), shape, endpoint=True).astype(dtype)
    spacing = tuple(draw(st.floats(0.25, 6.0).map(lambda v: round(v, 3))) for _ in range(3))
    origin = tuple(draw(st.floats(-400, 400).map(lambda v: round(v, 2))) for _ in range(3))
    return array, Geometry(shape, spacing, origin, draw(rotations()))


@contextmanager
def scratch() -> Iterator[Path]:
    """A private temporary folder per example (hypothesis runs many examples in one test)."""
    with tempfile.TemporaryDirectory(prefix="fuzz") as d:
        yield Path(d)


def outcome(read: Callable[[Path], object], path: Path) -> tuple[object | None, AutoliverError | None]:
    """(result, None) or (None, error); the error must name ``path``. Any other exception
    propagates and fails the test."""
    try:
        return read(path), None
    except AutoliverError as exc:
        assert str(path) in str(exc), f"the message does not name the file {path}: {exc}"
        return None, exc


def check_image(result) -> tuple[np.ndarray, Geometry]:
    """A returned (array, geometry) must be usable: consistent, finite, a real grid."""
    array, geometry = result
    assert tuple(array.shape) == tuple(geometry.shape) and array.ndim == 3
    if array.dtype.kind == "f":
        assert np.isfinite(array).all(), "a checked read returned NaN/Inf voxels"
    problems = geometry_problems(geometry.spacing, geometry.origin, geometry.direction)
    assert not problems, problems
    return array, geometry


def same_image(result, array: np.ndarray, geometry: Geometry, exact_geometry: bool = True) -> None:
    """The read volume equals what was written (voxels exactly; geometry to float32 precision)."""
    got, geom = check_image(result)
    assert got.shape == array.shape
    np.testing.assert_array_equal(got.astype(np.float64), array.astype(np.float64))
    if exact_geometry:
        np.testing.assert_allclose(geom.spacing, geometry.spacing, rtol=1e-5)
        np.testing.assert_allclose(geom.origin, geometry.origin, rtol=0, atol=1e-3)
        np.testing.assert_allclose(geom.direction, geometry.direction, rtol=0, atol=1e-5)


def flip_byte(data: bytes, index: int, mask: int) -> bytes:
    """``data`` with byte ``index`` (modulo its length) XOR ``mask`` (1..255)."""
    if not data:
        return data
    i = index % len(data)
    return data[:i] + bytes([data[i] ^ mask]) + data[i + 1 :]
