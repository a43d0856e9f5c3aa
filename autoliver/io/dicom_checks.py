"""Checks of a DICOM series' slice geometry before it becomes a volume.

ITK stacks a series' slices with one uniform spacing taken from the first two positions and
only warns on stderr when they are not evenly spaced, so a series with a missing, duplicated
or truncated slice becomes a volume with wrong geometry (and wrong volumes and tumour sizes
in every report). Here every slice's header is read (no pixel data): image orientation,
rows and columns must agree, positions along the slice normal must be distinct and evenly
spaced, and an uncompressed slice must hold all its pixel bytes. GDCM also reads a NaN or zero
Pixel Spacing as 1.0, a negative one as a flipped axis and a skewed or scaled Image Orientation
as the identity, so pixel spacing must be two plausible sizes and the orientation two orthogonal
unit vectors; and slices x rows x columns must fit this machine (``autoliver.io.limits``).
Otherwise the series is refused with a message naming the folder and what is wrong.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autoliver.core.errors import ImageReadError
from autoliver.core.geometry import ORTHONORMAL_ATOL, spacing_problems
from autoliver.io.limits import voxel_budget_problem

UNCOMPRESSED = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")
GAP_TOLERANCE = 0.1  # a spacing may differ from the median by at most 10 % (and 0.05 mm)
TAGS = {"position": "0020|0032", "orientation": "0020|0037", "rows": "0028|0010", "columns": "0028|0011",
        "bits": "0028|0100", "samples": "0028|0002", "syntax": "0002|0010", "pixel_spacing": "0028|0030"}


def _slice_header(path: str) -> dict[str, str]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise ImageReadError(f"{path}: DICOM slice header cannot be read; the file is damaged: re-copy the series") from None
    return {k: reader.GetMetaData(t).strip().strip("\x00").strip() for k, t in TAGS.items() if reader.HasMetaDataKey(t)}


def _floats(text: str, n: int) -> np.ndarray | None:
    try:
        values = np.array([float(v) for v in text.split("\\")], dtype=np.float64)
    except ValueError:
        return None
    return values if values.size == n and np.all(np.isfinite(values)) else None


def _slice_problems(folder: Path, first: dict[str, str], n_slices: int) -> None:
    """What every slice shares (checked once slices agree): pixel spacing, orientation, size."""
    spacing = _floats(first.get("pixel_spacing", "1\\1"), 2)
    if spacing is None or spacing_problems(spacing):
        raise ImageReadError(f"{folder}: Pixel Spacing (0028,0030) {first.get('pixel_spacing', '')[:40]!r} is not two positive voxel sizes "
                             "in mm; the series' headers are damaged: re-export it")
    orientation = _floats(first.get("orientation", ""), 6)
    if orientation is None and first.get("orientation"):
        raise ImageReadError(f"{folder}: Image Orientation (Patient) {first['orientation'][:60]!r} is not six finite numbers; "
                             "the series' headers are damaged: re-export it")
    if orientation is not None:
        row, col = orientation[:3], orientation[3:]
        gram = np.array([[row @ row, row @ col], [row @ col, col @ col]])
        if not np.allclose(gram, np.eye(2), rtol=0.0, atol=ORTHONORMAL_ATOL):
            raise ImageReadError(f"{folder}: Image Orientation (Patient) {first.get('orientation', '')[:60]!r} is not two orthogonal unit "
                                 "vectors (scaled or skewed axes); the series' headers are damaged: re-export it")
    try:
        rows, columns = int(first.get("rows", "0")), int(first.get("columns", "0"))
        bits = max(1, int(first.get("bits", "16")) // 8) * max(1, int(first.get("samples", "1")))
    except ValueError:
        raise ImageReadError(f"{folder}: slices with unreadable Rows / Columns / Bits Allocated; re-export the series") from None
    if rows < 1 or columns < 1:
        raise ImageReadError(f"{folder}: slices of {rows} x {columns} pixels; re-export the series")
    problem = voxel_budget_problem((n_slices, rows, columns), bits)
    if problem:
        raise ImageReadError(f"{folder}: the series ({n_slices} slices of {rows} x {columns}) {problem}")


def check_series_geometry(folder: str | Path, files: list[str]) -> None:
    """Refuse a series whose slices disagree, repeat, leave gaps, are truncated or declare an
    impossible geometry or size (module docstring)."""
    folder = Path(folder)
    headers = [_slice_header(f) for f in files]
    if not headers:
        return
    name = lambda i: Path(files[i]).name  # noqa: E731
    first = headers[0]
    for i, h in enumerate(headers):
        for key in ("orientation", "rows", "columns", "pixel_spacing"):
            if h.get(key) != first.get(key):
                raise ImageReadError(f"{folder}: slice {name(i)} has {key.replace('_', ' ')} {h.get(key)!r}, slice {name(0)} {first.get(key)!r}; "
                                     "a series must be one stack of equal slices: split it or re-export it")
    _slice_problems(folder, first, len(files))
    if len(files) < 2:
        return
    orientation = _floats(first.get("orientation", ""), 6)
    positions = [_floats(h.get("position", ""), 3) for h in headers]
    if orientation is None or any(p is None for p in positions):
        raise ImageReadError(f"{folder}: slices without a valid Image Position / Orientation (Patient); their order and spacing "
                             "cannot be known: re-export the series with these tags")
    normal = np.cross(orientation[:3], orientation[3:])
    depth = np.sort(np.array([float(np.dot(p, normal)) for p in positions]))
    steps = np.diff(depth)
    duplicates = int(np.count_nonzero(steps < 1e-3))
    if duplicates:
        raise ImageReadError(f"{folder}: {duplicates} slice position(s) appear twice (duplicated slices); remove the copies")
    median = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - median) > max(0.05, GAP_TOLERANCE * median))
    if bad.size:
        k = int(bad[0])
        raise ImageReadError(f"{folder}: slices are not evenly spaced: {steps[k]:.3f} mm between positions {depth[k]:.2f} and "
                             f"{depth[k + 1]:.2f} mm where the series has {median:.3f} mm ({bad.size} such gap(s): missing or extra "
                             "slices); re-export the complete series")
    for i, h in enumerate(headers):
        if h.get("syntax") in UNCOMPRESSED:
            try:
                need = int(h["rows"]) * int(h["columns"]) * int(h.get("samples", "1")) * max(1, int(h.get("bits", "16")) // 8)
            except (KeyError, ValueError):
                continue
            if os.path.getsize(files[i]) < need:
                raise ImageReadError(f"{folder}: slice {name(i)} is truncated ({os.path.getsize(files[i])} bytes for {need} bytes of "
                                     "pixels); re-copy the series")
