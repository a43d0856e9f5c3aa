"""Reading and writing CT volumes: NIfTI, NRRD, MHA/MHD and DICOM series (via SimpleITK).

Array layout everywhere in autoliver is (Z, Y, X); ``Geometry.spacing`` is in mm in the
same order. ``origin`` and ``direction`` are physical (LPS) quantities and are kept exactly as
SimpleITK reports them (x, y, z order; direction as a row-major 3x3 matrix).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autoliver.core.errors import ImageReadError
from autoliver.core.geometry import geometry_problems
from autoliver.io.atomic import atomic_path, temporary_dir
from autoliver.io.dicom_checks import check_series_geometry
from autoliver.io.nifti_raw import check_nifti_complete
from autoliver.io.text_headers import check_text_header

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
DETACHED_SUFFIXES = (".nhdr", ".mhd")  # a header file plus a separate data file


@dataclass(frozen=True)
class Geometry:
    """Where a voxel grid sits in the patient: everything needed to write a volume back."""

    shape: tuple[int, int, int]  # (z, y, x) voxels
    spacing: tuple[float, float, float]  # (z, y, x) mm
    origin: tuple[float, float, float]  # physical (x, y, z) mm, as SimpleITK
    direction: tuple[float, ...]  # 3x3 row-major, as SimpleITK

    def to_json(self) -> dict:
        return {
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }

    @classmethod
    def from_json(cls, d: dict) -> "Geometry":
        return cls(
            shape=tuple(int(v) for v in d["shape"]),
            spacing=tuple(float(v) for v in d["spacing"]),
            origin=tuple(float(v) for v in d["origin"]),
            direction=tuple(float(v) for v in d["direction"]),
        )

    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        return cls(
            shape=tuple(int(v) for v in reversed(image.GetSize())),
            spacing=tuple(float(v) for v in reversed(image.GetSpacing())),
            origin=tuple(float(v) for v in image.GetOrigin()),
            direction=tuple(float(v) for v in image.GetDirection()),
        )

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(tuple(reversed(self.spacing)))
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


def image_suffix(path: str | os.PathLike) -> str | None:
    """The recognised image suffix of ``path`` ('.nii.gz', '.mha', ...), or None."""
    name = str(path).lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def is_dicom_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))


def dicom_series_files(folder: str | os.PathLike, series_uid: str | None = None) -> list[str]:
    """The slice files of one DICOM series, ordered by the headers' slice positions.

    A folder holding several series is an error that lists them, unless ``series_uid`` picks
    one.
    """
    folder = Path(folder)
    ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    if not ids:
        raise ImageReadError(f"{folder}: no DICOM series found; point to a folder of DICOM slices")
    if series_uid is None:
        if len(ids) > 1:
            listing = ", ".join(f"{uid} ({len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))} files)" for uid in ids)
            raise ImageReadError(
                f"{folder}: holds {len(ids)} DICOM series ({listing}); choose one with --series UID "
                "or move each series into its own folder"
            )
        series_uid = ids[0]
    elif series_uid not in ids:
        raise ImageReadError(f"{folder}: series {series_uid} not found; series present: {', '.join(ids)}")
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid))
    check_series_geometry(folder, files)
    return files


def check_geometry(path: str | os.PathLike, spacing, origin, direction) -> None:
    """Refuse a grid (as SimpleITK reports it, x-first) whose voxel size is out of range, whose
    origin is not finite or whose direction is not orthonormal: ImageReadError naming the file."""
    problems = geometry_problems(spacing, origin, direction)
    if problems:
        raise ImageReadError([f"{path}: {p}; fix the image's header (voxel size, position, orientation) and re-export it" for p in problems])


def _reader_detail(exc: RuntimeError) -> str:
    """The useful line of an ITK exception: its 'ITK ERROR' description when there is one."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    for line in lines:
        if "ITK ERROR" in line or "ERROR:" in line:
            return line.split("):", 1)[-1].strip() or line
    return lines[-1] if lines else "unknown reader error"


def read_sitk(path: str | os.PathLike, series_uid: str | None = None) -> sitk.Image:
    """Read a file or a DICOM series folder into a SimpleITK image; clear error on failure.

    A truncated NIfTI file is an error too (see ``check_nifti_complete``), and so is a grid
    with an impossible geometry (``check_geometry``).
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: file not found")
    if path.is_file():
        check_nifti_complete(path)
        check_text_header(path)
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(dicom_series_files(path, series_uid))
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except ImageReadError:
        raise
    except RuntimeError as exc:
        raise ImageReadError(
            f"{path}: cannot be read as an image ({_reader_detail(exc)}); the file may be truncated "
            "or not an image: re-export or re-copy it"
        ) from None
    check_geometry(path, image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    return image


def read_header(path: str | os.PathLike) -> tuple[Geometry | None, int, str]:
    """Geometry (None unless 3D), dimension and pixel type of a file without reading its voxels.

    A multi-component image reports a pixel type starting with "vector of".
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: file not found")
    if path.is_dir():
        image = read_sitk(path)
        return Geometry.of(image) if image.GetDimension() == 3 else None, image.GetDimension(), image.GetPixelIDTypeAsString()
    check_text_header(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise ImageReadError(f"{path}: cannot read the image header ({_reader_detail(exc)}); the file may be truncated or not an image: "
                             "re-export it") from None
    if image_suffix(path) not in (".nii", ".nii.gz"):  # NIfTI: its raw header is checked where voxels are read, field by field
        check_geometry(path, reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
    dim = reader.GetDimension()
    geom = None
    if dim == 3:
        geom = Geometry(
            shape=tuple(int(v) for v in reversed(reader.GetSize())),
            spacing=tuple(float(v) for v in reversed(reader.GetSpacing())),
            origin=tuple(float(v) for v in reader.GetOrigin()),
            direction=tuple(float(v) for v in reader.GetDirection()),
        )
    return geom, dim, sitk.GetPixelIDValueAsString(reader.GetPixelID())


def read_image(path: str | os.PathLike, series_uid: str | None = None, dtype=None) -> tuple[np.ndarray, Geometry]:
    """Read a 3D volume as a (Z, Y, X) array and its geometry.

    Single-component 3D images only: a 2D, 4D or multi-component image is an error naming the
    file. ``dtype`` casts the array (e.g. ``np.float32`` for intensities).
    """
    image = read_sitk(path, series_uid)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(
            f"{path}: is a {image.GetDimension()}D image with {image.GetNumberOfComponentsPerPixel()} "
            "component(s); autoliver needs one 3D single-channel volume per file: split it first"
        )
    array = sitk.GetArrayFromImage(image)
    if dtype is not None and array.dtype != dtype:
        array = array.astype(dtype, copy=False)
    return array, Geometry.of(image)


def write_image(path: str | os.PathLike, array: np.ndarray, geometry: Geometry, compress: bool = True) -> None:
    """Write a (Z, Y, X) array with ``geometry`` atomically; the format follows the suffix."""
    if tuple(array.shape) != tuple(geometry.shape):
        raise ValueError(f"array shape {array.shape} does not match geometry shape {geometry.shape}")
    image = geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(array)))
    suffix = image_suffix(path) or ""
    if suffix in DETACHED_SUFFIXES:
        _write_detached(Path(path), image, compress)
        return
    with atomic_path(path, suffix=suffix) as tmp:
        _sitk_write(image, tmp, compress, Path(path), int(array.nbytes))


def _sitk_write(image: sitk.Image, tmp: Path, compress: bool, target: Path, n_bytes: int) -> None:
    """``sitk.WriteImage`` to ``tmp``, then proof that the file is whole: ITK's NIfTI writer only
    prints "wrote only N of M bytes" when the disk fills and leaves a truncated file, and its
    other writers raise a RuntimeError without an errno. Either becomes an ``OSError`` naming
    ``target`` (ENOSPC when the disk has less room than the image needs)."""
    try:
        sitk.WriteImage(image, str(tmp), compress)
        check_nifti_complete(tmp)
    except (RuntimeError, ImageReadError) as exc:
        free = shutil.disk_usage(tmp.parent).free
        code = errno.ENOSPC if free < n_bytes + (1 << 20) or "No space left" in str(exc) else errno.EIO
        reason = os.strerror(code) if code == errno.ENOSPC else f"the image could not be written completely ({str(exc).splitlines()[-1][:160]})"
        raise OSError(code, reason, str(target)) from None


def _write_detached(path: Path, image: sitk.Image, compress: bool) -> None:
    """Header + data file formats (.mhd, .nhdr): the header names its data file, so both are
    written under their final names in a temporary folder, then moved, data first, header last."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = temporary_dir(path.parent, path.name)
    try:
        _sitk_write(image, tmp_dir / path.name, compress, path, int(np.prod(image.GetSize())) * image.GetSizeOfPixelComponent())
        for produced in sorted(tmp_dir.iterdir(), key=lambda p: p.name == path.name):
            os.replace(produced, path.parent / produced.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
