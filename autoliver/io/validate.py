"""Validate a raw dataset completely and report every problem at once; nothing is written.

Structure (missing/extra files, dataset.json, paths escaping the folder) comes from
``io.dataset.discover``. Then every case is checked on its own (in parallel over cases, one case
at a time per worker so memory stays bounded by the largest case):

- each file is readable (header and voxels: a truncated file fails here), 3D, single-component,
  with finite positive spacing;
- images hold no NaN/Inf voxels;
- the channels of a case and its label share shape, spacing, origin and direction (within the
  tolerances given);
- label values are integers declared in dataset.json's "labels".

Test images (imagesTs) get the same file checks; they have no label.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autoliver.core.errors import DatasetError, ImageReadError
from autoliver.core.labels import label_value_problems
from autoliver.core.parallel import parallel_map
from autoliver.io.dataset import Case, RawDataset, discover
from autoliver.io.images import Geometry, read_header, read_image, read_sitk
from autoliver.io.nifti_raw import nifti_header_spacing, nifti_nonfinite_count

log = logging.getLogger(__name__)

_SLAB_VOXELS = 1 << 24  # non-finite checks run over slabs of about this many voxels


@dataclass(frozen=True)
class Tolerances:
    spacing_rtol: float = 1e-3
    origin_atol_mm: float = 1e-2
    direction_atol: float = 1e-3


def _header_problems(path: Path) -> tuple[Geometry | None, list[str]]:
    """Read the header; report a file that is unreadable, not 3D, multi-component or badly spaced."""
    try:
        geom, dim, pixel_type = read_header(path)
    except DatasetError as exc:
        return None, list(exc.problems)
    problems = []
    if pixel_type.startswith("vector") or "complex" in pixel_type:
        problems.append(
            f"{path}: holds {pixel_type} voxels (several components per voxel); store each channel "
            "as its own single-component file (<case>_0000, <case>_0001, ...) and declare it in channel_names"
        )
    if dim != 3:
        problems.append(f"{path}: is a {dim}D image; every file must be one 3D volume (stack 2D slices into a volume, split 4D series into 3D files)")
        return None, problems
    raw = nifti_header_spacing(path)  # ITK reads a zero/NaN NIfTI pixdim as 1.0: look at the header
    spacing = geom.spacing if raw is None else tuple(reversed(raw[:3]))
    if not all(math.isfinite(v) and v > 0 for v in spacing):
        problems.append(f"{path}: spacing {spacing} (z, y, x mm) is zero, negative or NaN; fix the file's header (voxel size) before using it")
    return (None if problems else geom), problems


def _nonfinite_count(path: Path, array: np.ndarray) -> int:
    """NaN/Inf voxels of ``path`` (read as ``array``). ITK reads NIfTI NaN/Inf as 0, so for NIfTI
    files the raw voxel bytes are scanned too; the array itself is scanned as well, since an
    intensity scaling (``scl_slope``) can overflow finite stored values to Inf."""
    if not np.issubdtype(array.dtype, np.floating):
        return 0
    raw = nifti_nonfinite_count(path)
    if raw:
        return raw
    flat = array.reshape(-1)
    return int(sum(np.count_nonzero(~np.isfinite(flat[i : i + _SLAB_VOXELS])) for i in range(0, flat.size, _SLAB_VOXELS)))


def _read_voxels(path: Path) -> tuple[sitk.Image | None, list[str]]:
    """The whole image (voxels read: a truncated or corrupt file fails here), or its problems."""
    try:
        return read_sitk(path), []
    except DatasetError as exc:
        return None, list(exc.problems)


def read_checked_image(path: Path, series_uid: str | None = None) -> tuple[np.ndarray, Geometry]:
    """Read one input image (Z, Y, X) after the checks ITK's readers would silently pass:
    zero/NaN voxel size, NaN/Inf voxels, not 3D. Raises ImageReadError listing every problem."""
    path = Path(path)
    if path.is_file():
        _, problems = _header_problems(path)
        if problems:
            raise ImageReadError(problems)
    image, geometry = read_image(path, series_uid=series_uid if path.is_dir() else None)
    n_bad = _nonfinite_count(path, image)
    if n_bad:
        raise ImageReadError(f"{path}: {n_bad} NaN/Inf voxels; replace them (e.g. with the scan's minimum HU) and re-export")
    return image, geometry


def geometry_mismatch(ref_path: Path, ref: Geometry, path: Path, geom: Geometry, tol: Tolerances) -> list[str]:
    """Compare ``geom`` (of ``path``) with ``ref`` (of ``ref_path``); one message per differing field."""
    out = []
    fix = f"resample or re-export {path.name} onto the grid of {ref_path.name}"
    if ref.shape != geom.shape:
        return [f"{path}: shape {geom.shape} (z, y, x) differs from {ref_path} {ref.shape}; {fix}"]
    if not np.allclose(geom.spacing, ref.spacing, rtol=tol.spacing_rtol, atol=0.0):
        out.append(f"{path}: spacing {geom.spacing} mm differs from {ref_path} {ref.spacing} (rtol {tol.spacing_rtol}); {fix}")
    if not np.allclose(geom.origin, ref.origin, rtol=0.0, atol=tol.origin_atol_mm):
        out.append(f"{path}: origin {geom.origin} mm differs from {ref_path} {ref.origin} (atol {tol.origin_atol_mm} mm); {fix}")
    if not np.allclose(geom.direction, ref.direction, rtol=0.0, atol=tol.direction_atol):
        out.append(f"{path}: direction {geom.direction} differs from {ref_path} {ref.direction} (atol {tol.direction_atol}); {fix}")
    return out


def _label_value_problems(path: Path, array: np.ndarray, declared: set[int]) -> list[str]:
    # without declared labels (discover reported that already) only the values' type is checked
    return label_value_problems(path, array, declared or None, allowed_from='dataset.json "labels"')


def _check_case(case: Case, declared: set[int], root: Path, tol: Tolerances, is_test: bool) -> list[str]:
    """Every problem of one case (its image channels and, for training cases, its label)."""
    problems: list[str] = []
    root = Path(os.path.abspath(root))
    ref: tuple[Path, Geometry] | None = None
    for path in case.images:
        if not Path(os.path.abspath(path)).is_relative_to(root):
            continue  # reported by discover; never read files outside the dataset
        geom, more = _header_problems(path)
        problems += more
        if geom is None:
            continue
        image, more = _read_voxels(path)
        problems += more
        if image is None:
            continue
        n_bad = _nonfinite_count(path, sitk.GetArrayViewFromImage(image))
        if n_bad:
            problems.append(f"{path}: {n_bad} NaN/Inf voxels; replace them (e.g. with the scan's minimum HU) and re-export")
        del image
        if ref is None:
            ref = (path, geom)
        else:
            problems += geometry_mismatch(ref[0], ref[1], path, geom, tol)
    if is_test or case.label is None or not Path(os.path.abspath(case.label)).is_relative_to(root):
        return problems
    geom, more = _header_problems(case.label)
    problems += more
    if geom is None:
        return problems
    if ref is not None:
        problems += geometry_mismatch(ref[0], ref[1], case.label, geom, tol)
    image, more = _read_voxels(case.label)
    problems += more
    if image is not None:
        problems += _label_value_problems(case.label, sitk.GetArrayViewFromImage(image), declared)
    return problems


def validate_dataset(
    root: Path,
    n_jobs: int = 1,
    progress: bool = True,
    spacing_rtol: float = 1e-3,
    origin_atol_mm: float = 1e-2,
    direction_atol: float = 1e-3,
) -> tuple[RawDataset | None, list[str]]:
    """Check a raw dataset; return (dataset or None, every problem found). Writes nothing.

    ``n_jobs`` worker processes check cases in parallel (1: in this process). Tolerances
    apply between the channels of a case and its label: spacing relative, origin in mm,
    direction (cosines) absolute.
    """
    if n_jobs < 1:
        raise ValueError(f"n_jobs must be >= 1, got {n_jobs}")
    for name, value in (("spacing_rtol", spacing_rtol), ("origin_atol_mm", origin_atol_mm), ("direction_atol", direction_atol)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite non-negative number, got {value}")
    root = Path(root)
    dataset, problems = discover(root)
    if dataset is None:
        return None, problems
    tol = Tolerances(spacing_rtol, origin_atol_mm, direction_atol)
    declared = set(dataset.labels.values())
    jobs = [(c, False) for c in dataset.training] + [(c, True) for c in dataset.test]
    log.info("validating %s: %d training and %d test cases", root, len(dataset.training), len(dataset.test))

    args = [(case, declared, root, tol, is_test) for case, is_test in jobs]
    results = parallel_map(_check_case, args, n_jobs=n_jobs, progress=progress, desc=f"validate {root.name}")
    for res in results:
        problems += res
    if problems:
        log.warning("%s: %d problem(s) found", root, len(problems))
    return dataset, problems


def check_dataset(root: Path, **options) -> RawDataset:
    """Validate (``options`` as for ``validate_dataset``) and return the dataset; raise one
    DatasetError listing every problem."""
    dataset, problems = validate_dataset(root, **options)
    if problems or dataset is None:
        raise DatasetError(problems)
    return dataset
