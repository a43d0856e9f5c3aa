"""The slices of one DICOM image series, read from their headers (pydicom, no pixel data).

DICOM-SEG objects refer to their source images by SOP Instance UID and place each frame by
Image Position (Patient); to put a segmentation frame on a volume slice both are needed, so
here each slice's header is kept with its position and UID, ordered as the volume's slices:
ascending along the slice normal (row x column direction cosines), the order in which
SimpleITK/GDCM stacks a series (``autoliver.io.images.read_image``). The slice order comes
from the headers, never from the file names or the order the files were given in.

Anonymised series sometimes carry empty SOP Class / SOP Instance UIDs in the data set while the
file meta header keeps them; the file meta values are used then (they are the same by definition).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from autoliver.core.errors import ImageReadError
from autoliver.io.dicom_checks import check_series_geometry
from autoliver.io.images import Geometry

log = logging.getLogger(__name__)

POSITION_TOLERANCE = 0.1  # a frame may sit at most this fraction of a voxel off its slice


@dataclass(frozen=True)
class SeriesSlices:
    """A series' slice headers in volume order (slice k of the (Z, Y, X) array is ``files[k]``)."""

    files: tuple[Path, ...]
    headers: tuple[Dataset, ...]
    sop_uids: tuple[str, ...]
    geometry: Geometry

    def index_of_uid(self) -> dict[str, int]:
        return {uid: k for k, uid in enumerate(self.sop_uids)}


def instance_uid(ds: Dataset) -> str:
    """SOP Instance UID of a file, from the data set or, when that is empty, its file meta."""
    uid = str(ds.get("SOPInstanceUID", "") or "").strip()
    if not uid and getattr(ds, "file_meta", None) is not None:
        uid = str(ds.file_meta.get("MediaStorageSOPInstanceUID", "") or "").strip()
    return uid


def class_uid(ds: Dataset) -> str:
    """SOP Class UID of a file, from the data set or, when that is empty, its file meta."""
    uid = str(ds.get("SOPClassUID", "") or "").strip()
    if not uid and getattr(ds, "file_meta", None) is not None:
        uid = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "").strip()
    return uid


def read_dicom_header(path: str | os.PathLike) -> Dataset:
    """The header of a DICOM file without its pixel data; ImageReadError naming the file."""
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise ImageReadError(f"{path}: not a readable DICOM file ({exc}); remove it from the series or re-copy it") from None


def floats(ds: Dataset, keyword: str, n: int, path: Path) -> np.ndarray:
    """A numeric multi-valued tag as ``n`` finite floats, else ImageReadError naming the file."""
    try:
        values = np.array([float(v) for v in (ds.get(keyword) or [])], dtype=np.float64)
    except (TypeError, ValueError):
        values = np.zeros(0)
    if values.size != n or not np.all(np.isfinite(values)):
        raise ImageReadError(f"{path}: {keyword} is missing or not {n} numbers; the slice cannot be placed: re-export the series with it")
    return values


def plane_axes(orientation: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row direction, column direction and slice normal (unit vectors, LPS) of an Image Orientation."""
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    return row, col, normal / np.linalg.norm(normal)


def direction_of(row: np.ndarray, col: np.ndarray, normal: np.ndarray) -> tuple[float, ...]:
    """A Geometry direction (3x3 row-major, columns = x, y, z axes) from the three unit vectors."""
    return tuple(float(v) for v in np.stack([row, col, normal], axis=1).reshape(-1))


def read_series_slices(files: Sequence[str | os.PathLike], check: bool = True) -> SeriesSlices:
    """Read the headers of a series' slice files and order them as the volume's slices.

    ``check`` first runs ``check_series_geometry`` (equal slices, no gaps or duplicates).
    """
    paths = [Path(f) for f in files]
    if not paths:
        raise ImageReadError("no DICOM slice files given; point to the source series' files")
    folder = Path(os.path.commonpath([str(p.parent) for p in paths]))
    if check:
        check_series_geometry(folder, [str(p) for p in paths])
    headers = [read_dicom_header(p) for p in paths]
    for p, ds in zip(paths, headers):
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise ImageReadError(f"{p}: a multi-frame image; DICOM-SEG is supported for series of single-frame slices only")
        if not instance_uid(ds):
            raise ImageReadError(f"{p}: no SOP Instance UID; segmentation frames cannot refer to the slice: re-export the series")
    series = {str(ds.get("SeriesInstanceUID", "") or "") for ds in headers}
    if len(series) > 1:
        raise ImageReadError(f"{folder}: files of {len(series)} series given ({', '.join(sorted(series))[:200]}); give one series")
    uids = [instance_uid(ds) for ds in headers]
    if len(set(uids)) != len(uids):
        raise ImageReadError(f"{folder}: two slice files share one SOP Instance UID (copies of one slice); remove the copies")
    orientation = floats(headers[0], "ImageOrientationPatient", 6, paths[0])
    row, col, normal = plane_axes(orientation)
    positions = np.stack([floats(ds, "ImagePositionPatient", 3, p) for p, ds in zip(paths, headers)])
    order = np.argsort(positions @ normal, kind="stable")
    depth = (positions @ normal)[order]
    pixel_spacing = floats(headers[0], "PixelSpacing", 2, paths[0])  # (between rows = y, between columns = x)
    if len(paths) > 1:
        dz = float((depth[-1] - depth[0]) / (len(paths) - 1))
    else:
        dz = float(headers[0].get("SpacingBetweenSlices") or headers[0].get("SliceThickness") or 1.0)
    geometry = Geometry(
        shape=(len(paths), int(headers[0].Rows), int(headers[0].Columns)),
        spacing=(dz, float(pixel_spacing[0]), float(pixel_spacing[1])),
        origin=tuple(float(v) for v in positions[order[0]]),
        direction=direction_of(row, col, normal),
    )
    return SeriesSlices(
        files=tuple(paths[i] for i in order),
        headers=tuple(headers[i] for i in order),
        sop_uids=tuple(uids[i] for i in order),
        geometry=geometry,
    )


def geometry_axes(geometry: Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The x (row), y (column) and z (slice) unit vectors of a Geometry, LPS."""
    d = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    return d[:, 0], d[:, 1], d[:, 2]


def slice_index(geometry: Geometry, position: np.ndarray) -> tuple[float, float, float]:
    """Where an Image Position (Patient) falls on ``geometry``'s grid: (k, i, j) in voxels
    (slice index; row and column offsets of the frame's first pixel, 0 when it is on the grid)."""
    x, y, z = geometry_axes(geometry)
    offset = np.asarray(position, dtype=np.float64) - np.asarray(geometry.origin, dtype=np.float64)
    dz, dy, dx = geometry.spacing
    return float(offset @ z / dz), float(offset @ y / dy), float(offset @ x / dx)


def same_geometry(a: Geometry, b: Geometry, tolerance: float = POSITION_TOLERANCE) -> bool:
    """Same grid within ``tolerance`` voxels (shape equal, spacing within 0.1 %, directions within 1e-3)."""
    if tuple(a.shape) != tuple(b.shape):
        return False
    if not np.allclose(a.spacing, b.spacing, rtol=1e-3, atol=0.0):
        return False
    if not np.allclose(a.direction, b.direction, rtol=0.0, atol=1e-3):
        return False
    return all(abs(v) <= tolerance for v in slice_index(a, np.asarray(b.origin)))
