"""Label-only post-processing steps: pure functions of a (Z, Y, X) uint8 label map (0
background, 1 liver, 2 tumour) and its spacing (z, y, x) in mm. The input is never modified.

Connected components are 26-connected throughout. Every step works on the bounding box of
the voxels it concerns, so a 512 x 512 x 500 scan costs what its liver costs.

- ``largest_liver_component``: keep the largest component of the liver (labels 1 + 2
  together); everything outside it becomes background. With ``then_liver`` the liver label
  alone (1) is then reduced to its largest component as well (the other label-1 voxels become
  background; tumour voxels stay).
- ``tumour_inside_liver``: remove (to background) every tumour component with no voxel
  within ``dilation_mm`` of a liver (label 1) voxel. The test is per component, not per voxel:
  the core of a large tumour lies far from any liver voxel and must stay.
- ``min_tumour_volume``: tumour components smaller than ``min_volume_mm3`` become liver when
  they touch a liver voxel, else background.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from autoliver.core.geometry import check_spacing, grow_box
from autoliver.core.labels import LIVER, TUMOUR, liver_mask
from planning.crop import bbox_of

STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


def _check(seg: np.ndarray, spacing: Sequence[float] | None = None) -> None:
    if seg.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) label map, got shape {seg.shape}")
    if spacing is not None:
        check_spacing(spacing)


def _box_slices(box, pad: Sequence[int] = (0, 0, 0), shape: Sequence[int] | None = None) -> tuple[slice, ...]:
    slices = tuple(slice(lo, hi) for lo, hi in box)
    return slices if shape is None else grow_box(slices, pad, shape)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean (Z, Y, X) mask (the first in scan order
    on a tie); an empty mask stays empty."""
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros(mask.shape, dtype=bool)
    box = bbox_of(mask)
    if box is None:
        return out
    sl = _box_slices(box)
    comps, count = ndimage.label(mask[sl], structure=STRUCTURE_26)
    if count == 1:
        out[sl] = comps == 1
        return out
    sizes = np.bincount(comps.ravel(), minlength=count + 1)
    sizes[0] = 0
    out[sl] = comps == int(np.argmax(sizes))
    return out


def largest_liver_component(seg: np.ndarray, then_liver: bool = False) -> np.ndarray:
    """Keep the largest liver (1 + 2) component; optionally then the largest label-1 component."""
    _check(seg)
    out = np.array(seg, dtype=np.uint8, copy=True)
    keep = largest_component(liver_mask(out))
    out[~keep] = 0
    if then_liver:
        liver = out == LIVER
        out[liver & ~largest_component(liver)] = 0
    return out


def _region_near(liver: np.ndarray, region: tuple[slice, ...], sampling: list[float], dilation_mm: float) -> np.ndarray:
    """Voxels of ``region`` within ``dilation_mm`` of a liver voxel inside the region."""
    return ndimage.distance_transform_edt(~liver[region], sampling=sampling) <= dilation_mm + 1e-6


def tumour_inside_liver(seg: np.ndarray, spacing: Sequence[float], dilation_mm: float = 5.0) -> np.ndarray:
    """Remove tumour components with no voxel within ``dilation_mm`` of a liver voxel.

    Distances are Euclidean in mm (``distance_transform_edt`` with the spacing), computed only
    where a liver voxel can be within reach: on each component's bounding box grown by the
    dilation (few components), or once on the tumours' grown box cut to the liver's (many
    components), whichever holds fewer voxels. Both give the exact answer.
    """
    _check(seg, spacing)
    if not dilation_mm >= 0:
        raise ValueError(f"dilation_mm must be >= 0, got {dilation_mm}")
    out = np.array(seg, dtype=np.uint8, copy=True)
    tumour = out == TUMOUR
    t_box = bbox_of(tumour)
    if t_box is None:
        return out
    t_sl = _box_slices(t_box)
    comps, count = ndimage.label(tumour[t_sl], structure=STRUCTURE_26)
    del tumour
    liver = out == LIVER
    sampling = [float(s) for s in spacing]
    pad = [int(np.ceil(dilation_mm / s)) for s in sampling]
    keep = np.zeros(count + 1, dtype=bool)
    keep[0] = True
    l_box = bbox_of(liver)
    if l_box is not None:
        objects = ndimage.find_objects(comps)
        grown = [tuple(slice(max(0, s.start + t.start - p), min(n, s.stop + t.start + p)) for s, t, p, n in zip(obj, t_sl, pad, out.shape))
                 for obj in objects]
        per_component = sum(int(np.prod([g.stop - g.start for g in box])) for box in grown)
        region = tuple(slice(max(t.start - p, lo - p, 0), min(t.stop + p, hi + p, n)) for t, (lo, hi), p, n in zip(t_sl, l_box, pad, out.shape))
        if all(r.start < r.stop for r in region):
            if per_component <= int(np.prod([r.stop - r.start for r in region])):
                for k, (obj, box) in enumerate(zip(objects, grown), start=1):
                    if not liver[box].any():
                        continue
                    own = np.zeros([b.stop - b.start for b in box], dtype=bool)
                    own[tuple(slice(s.start + t.start - b.start, s.stop + t.start - b.start) for s, t, b in zip(obj, t_sl, box))] = comps[obj] == k
                    keep[k] = bool(_region_near(liver, box, sampling, dilation_mm)[own].any())
            else:
                near = _region_near(liver, region, sampling, dilation_mm)
                lo = [max(r.start, t.start) for r, t in zip(region, t_sl)]
                hi = [min(r.stop, t.stop) for r, t in zip(region, t_sl)]
                if all(a < b for a, b in zip(lo, hi)):
                    sub = comps[tuple(slice(a - t.start, b - t.start) for a, b, t in zip(lo, hi, t_sl))]
                    keep[np.unique(sub[near[tuple(slice(a - r.start, b - r.start) for a, b, r in zip(lo, hi, region))] & (sub > 0)])] = True
    if not keep.all():
        out[t_sl][~keep[comps]] = 0
    return out


def _touching(comps: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sorted ids of the labels in ``comps`` with a 26-neighbour in ``mask`` (same shape)."""
    found = []
    n = comps.shape
    for dz, dy, dx in np.argwhere(STRUCTURE_26) - 1:
        if dz == dy == dx == 0:
            continue
        src = tuple(slice(max(0, -d), n_ - max(0, d)) for d, n_ in zip((dz, dy, dx), n))
        dst = tuple(slice(max(0, d), n_ - max(0, -d)) for d, n_ in zip((dz, dy, dx), n))
        shifted = comps[src]
        hit = shifted[mask[dst] & (shifted > 0)]
        if hit.size:
            found.append(np.unique(hit))
    return np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=comps.dtype)


def min_tumour_volume(seg: np.ndarray, spacing: Sequence[float], min_volume_mm3: float) -> np.ndarray:
    """Relabel tumour components smaller than ``min_volume_mm3``: liver where they touch a
    liver voxel (26-neighbourhood), else background."""
    _check(seg, spacing)
    if not min_volume_mm3 >= 0:
        raise ValueError(f"min_volume_mm3 must be >= 0, got {min_volume_mm3}")
    out = np.array(seg, dtype=np.uint8, copy=True)
    box = bbox_of(out == TUMOUR)
    if box is None:
        return out
    sl = _box_slices(box, (1, 1, 1), out.shape)
    sub = out[sl]
    comps, count = ndimage.label(sub == TUMOUR, structure=STRUCTURE_26)
    voxel_mm3 = float(np.prod([float(s) for s in spacing]))
    sizes = np.bincount(comps.ravel(), minlength=count + 1) * voxel_mm3
    small = np.zeros(count + 1, dtype=bool)
    small[1:] = sizes[1:] < min_volume_mm3
    if not small.any():
        return out
    small_comps = np.where(small[comps], comps, 0)
    to_liver = np.zeros(count + 1, dtype=bool)
    to_liver[_touching(small_comps, sub == LIVER)] = True
    where = small[comps]
    sub[where] = np.where(to_liver[comps[where]], LIVER, 0).astype(np.uint8)
    return out
