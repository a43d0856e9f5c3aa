"""Box and spacing helpers shared by every stage (arrays (Z, Y, X), spacing in mm, same order).

A *box* is a tuple of ``slice`` objects, one per axis, half-open and inside the array.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from planning.crop import bbox_of


def check_spacing(spacing: Sequence[float], ndim: int = 3, name: str = "spacing") -> tuple[float, ...]:
    """``spacing`` as ``ndim`` positive finite floats (mm), else ValueError naming the value."""
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {ndim} positive numbers in mm, got {spacing!r}") from None
    if len(values) != ndim or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"{name} must be {ndim} positive finite numbers (mm, {'z, y, x' if ndim == 3 else 'array order'}), got {values}")
    return values


def margin_voxels(spacing: Sequence[float], margin_mm: float) -> tuple[int, ...]:
    """A margin in mm as whole voxels per axis (rounded up)."""
    return tuple(int(math.ceil(float(margin_mm) / float(s))) for s in spacing)


def grow_box(box: Sequence[slice], pad: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    """``box`` grown by ``pad`` voxels per axis and clipped to ``shape``."""
    return tuple(slice(max(0, int(b.start) - int(p)), min(int(n), int(b.stop) + int(p))) for b, p, n in zip(box, pad, shape))


def mask_box(mask: np.ndarray, margin: int | Sequence[int] = 0) -> tuple[slice, ...] | None:
    """The smallest box holding every True voxel of ``mask`` (any number of axes), grown by
    ``margin`` voxels (one number or one per axis) and clipped; None when the mask is empty."""
    extents: list[tuple[int, int]] = []
    if mask.ndim == 3:
        box3 = bbox_of(mask)
        if box3 is None:
            return None
        extents = list(box3)
    else:
        for axis in range(mask.ndim):
            hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
            if hits.size == 0:
                return None
            extents.append((int(hits[0]), int(hits[-1]) + 1))
    box = tuple(slice(int(lo), int(hi)) for lo, hi in extents)
    pad = (margin,) * mask.ndim if isinstance(margin, (int, np.integer)) else tuple(margin)
    return grow_box(box, pad, mask.shape)


def mask_box_mm(mask: np.ndarray, spacing: Sequence[float], margin_mm: float) -> tuple[slice, ...] | None:
    """:func:`mask_box` with the margin given in mm."""
    return mask_box(mask, margin_voxels(spacing, margin_mm))


MIN_SPACING_MM, MAX_SPACING_MM = 1e-6, 1e6  # a voxel size outside this is a damaged header, not a scan
ORTHONORMAL_ATOL = 1e-3  # direction cosines: |D Dᵀ - I| per entry (DICOM and NIfTI store them rounded)


def spacing_problems(spacing: Sequence[float], what: str = "spacing") -> list[str]:
    """Why ``spacing`` (mm, any axis order) is not a voxel size; empty when it is."""
    values = [float(v) for v in spacing]
    if all(math.isfinite(v) and MIN_SPACING_MM <= v <= MAX_SPACING_MM for v in values):
        return []
    return [f"{what} {tuple(values)} mm holds a zero, negative, non-finite or absurd voxel size (allowed: {MIN_SPACING_MM:g} to {MAX_SPACING_MM:g} mm)"]


def direction_problems(direction: Sequence[float], what: str = "direction") -> list[str]:
    """Why ``direction`` (a row-major square matrix of direction cosines) is not a rotation or
    reflection: non-finite, singular, scaled or skewed; empty when it is orthonormal."""
    values = np.asarray([float(v) for v in direction], dtype=np.float64)
    n = int(round(math.sqrt(values.size)))
    if n * n != values.size or n == 0:
        return [f"{what} has {values.size} values, not a square matrix"]
    if not np.isfinite(values).all():
        return [f"{what} {tuple(values.tolist())} holds NaN or infinite values"]
    matrix = values.reshape(n, n)
    with np.errstate(over="ignore", invalid="ignore"):  # huge entries: an infinite product, not orthonormal either
        orthonormal = np.allclose(matrix @ matrix.T, np.eye(n), rtol=0.0, atol=ORTHONORMAL_ATOL)
    if not orthonormal:
        return [f"{what} {tuple(values.tolist())} is not orthonormal (its axes are scaled, skewed or degenerate)"]
    return []


def geometry_problems(spacing: Sequence[float], origin: Sequence[float], direction: Sequence[float]) -> list[str]:
    """Every reason a voxel grid's geometry cannot be a real scan's (spacing out of range,
    non-finite origin, direction not orthonormal); empty when it is usable."""
    out = spacing_problems(spacing)
    origin_values = [float(v) for v in origin]
    if not all(math.isfinite(v) for v in origin_values):
        out.append(f"origin {tuple(origin_values)} mm holds NaN or infinite values")
    return out + direction_problems(direction)
