"""Crop a CT to the body: the box around voxels above an air threshold (plus any label).

Used by the fingerprint (shape after cropping) and by preprocessing (the crop box stored in
each case's properties so predictions map back exactly). Array layout (Z, Y, X), HU.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BODY_THRESHOLD_HU = -500.0  # air and lung padding lie below; soft tissue, bone, table above
COARSE_STEP = 4  # the body mask's connected components are taken on a 4x subsampled grid

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # ((z0, z1), (y0, y1), (x0, x1)), half-open


def _axis_extent(mask: np.ndarray, axis: int) -> tuple[int, int] | None:
    other = tuple(a for a in range(mask.ndim) if a != axis)
    hit = np.flatnonzero(mask.any(axis=other))
    if hit.size == 0:
        return None
    return int(hit[0]), int(hit[-1]) + 1


def bbox_of(mask: np.ndarray) -> Box | None:
    """Half-open bounding box of the non-zero voxels of a 3D mask, or None if empty."""
    extents = [_axis_extent(mask, a) for a in range(3)]
    if any(e is None for e in extents):
        return None
    return tuple(extents)  # type: ignore[return-value]


def body_bbox(image: np.ndarray, label: np.ndarray | None = None, threshold: float = BODY_THRESHOLD_HU, margin: int = 2) -> Box:
    """Box around the body (the largest connected region above ``threshold``), grown by
    ``margin`` voxels, and always containing every labelled voxel.

    Falls back to the whole volume when nothing lies above the threshold (e.g. a phantom in
    other units), so cropping can never lose data the label marks.
    """
    if image.ndim != 3:
        raise ValueError(f"expected a 3D (Z, Y, X) array, got shape {image.shape}")
    s = COARSE_STEP
    coarse = image[::s, ::s, ::s] > threshold
    components, n = ndimage.label(coarse)
    coarse_box: Box | None = None
    if n > 0:
        sizes = np.bincount(components.ravel())[1:]
        # keep every component at least 5% of the largest: the body can appear split in two
        # by a thin slice gap, but table fragments and noise are small
        keep = np.flatnonzero(sizes >= 0.05 * sizes.max()) + 1
        coarse_box = bbox_of(np.isin(components, keep))
    box: tuple[tuple[int, int], ...]
    if coarse_box is None:
        box = tuple((0, int(n_)) for n_ in image.shape)
    else:
        box = tuple(
            (max(0, lo * s - s - margin), min(int(size), hi * s + s + margin))
            for (lo, hi), size in zip(coarse_box, image.shape)
        )
    if label is not None:
        lbox = bbox_of(label > 0)
        if lbox is not None:
            box = tuple((min(a0, b0), max(a1, b1)) for (a0, a1), (b0, b1) in zip(box, lbox))
    return box  # type: ignore[return-value]


def crop(array: np.ndarray, box: Box) -> np.ndarray:
    """View of ``array`` (..., Z, Y, X) inside ``box``."""
    (z0, z1), (y0, y1), (x0, x1) = box
    return array[..., z0:z1, y0:y1, x0:x1]


def box_shape(box: Box) -> tuple[int, int, int]:
    return tuple(hi - lo for lo, hi in box)  # type: ignore[return-value]
