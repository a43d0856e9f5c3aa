"""The per-case report (``<case>.json`` next to the segmentation): pure functions of a label
map and its geometry.

Definitions (labels 0 background, 1 liver, 2 tumour):

- liver volume: voxels labelled 1 or 2 (the tumour is part of the liver), in ml;
- tumours: the 26-connected components of label 2; per tumour its volume (ml), its largest
  diameter, its centroid and a size category;
- largest diameter (mm): the largest distance between the centres of two surface voxels of
  the component (a voxel with a 6-neighbour outside it), in physical space. It is computed on
  the convex hull's vertices of the surface points (scipy.spatial), so a large tumour costs
  little. Being centre to centre, it is up to about one voxel shorter than the outer extent;
- centroid: the mean voxel centre, in physical LPS coordinates (x, y, z) mm, through the
  image's direction and origin;
- size category by largest diameter d: ``small`` d < 10 mm, ``medium`` 10 mm <= d <= 20 mm,
  ``large`` d > 20 mm;
- tumour burden: tumour volume / liver volume (0 when there is no liver).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist

from autoliver.core.labels import liver_mask, tumour_mask
from autoliver.io.images import Geometry
from planning.crop import bbox_of, crop

SMALL_MM, LARGE_MM = 10.0, 20.0
SIZE_RULE = f"largest diameter d: small d < {SMALL_MM:g} mm, medium {SMALL_MM:g} <= d <= {LARGE_MM:g} mm, large d > {LARGE_MM:g} mm"
DIRECT_LIMIT = 2000  # up to this many surface points the pairwise maximum is taken directly


def voxel_volume_ml(geometry: Geometry) -> float:
    return float(np.prod(geometry.spacing)) / 1000.0


def index_to_physical(indices: np.ndarray, geometry: Geometry) -> np.ndarray:
    """(N, 3) voxel indices (z, y, x) -> (N, 3) physical LPS points (x, y, z) mm."""
    idx_xyz = np.asarray(indices, dtype=np.float64)[:, ::-1]
    spacing_xyz = np.asarray(geometry.spacing[::-1], dtype=np.float64)
    direction = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    return np.asarray(geometry.origin, dtype=np.float64) + (idx_xyz * spacing_xyz) @ direction.T


def largest_diameter(points: np.ndarray) -> float:
    """Largest distance between any two of (N, 3) points."""
    if len(points) < 2:
        return 0.0
    if len(points) > DIRECT_LIMIT:
        try:
            points = points[ConvexHull(points).vertices]
        except QhullError:  # flat (coplanar or collinear) point set: hull of a 2D projection
            centred = points - points.mean(0)
            _, _, vt = np.linalg.svd(centred, full_matrices=False)
            try:
                points = points[ConvexHull(centred @ vt[:2].T).vertices]
            except QhullError:
                proj = centred @ vt[0]
                points = points[[int(np.argmin(proj)), int(np.argmax(proj))]]
    return float(pdist(points).max())


def size_category(diameter_mm: float) -> str:
    if diameter_mm < SMALL_MM:
        return "small"
    return "medium" if diameter_mm <= LARGE_MM else "large"


def _mean_indices(comps: np.ndarray, count: int, voxels: np.ndarray, slab: int = 16) -> np.ndarray:
    """(count, 3) mean voxel index (z, y, x) of labels 1..count, summed slab by slab (bounded
    memory; ndimage.center_of_mass is slow for thousands of labels)."""
    sums = np.zeros((count + 1, 3))
    ny, nx = comps.shape[1:]
    yy, xx = np.meshgrid(np.arange(ny, dtype=np.float64), np.arange(nx, dtype=np.float64), indexing="ij")
    for z0 in range(0, comps.shape[0], slab):
        block = comps[z0:z0 + slab]
        flat = block.reshape(block.shape[0], -1)
        for i in range(block.shape[0]):
            row = flat[i]
            keep = row > 0
            if not keep.any():
                continue
            lab = row[keep]
            sums[:, 0] += np.bincount(lab, minlength=count + 1) * float(z0 + i)
            sums[:, 1] += np.bincount(lab, weights=yy.ravel()[keep], minlength=count + 1)
            sums[:, 2] += np.bincount(lab, weights=xx.ravel()[keep], minlength=count + 1)
    return sums[1:] / np.asarray(voxels, dtype=np.float64)[:, None]


def tumour_stats(seg: np.ndarray, geometry: Geometry) -> list[dict]:
    """One dict per 26-connected tumour component, largest volume first.

    Vectorised over components (a noisy prediction can have thousands): the surface is found
    once for all of them (a 6-neighbour of a component's voxel that is tumour belongs to the
    same component), volumes and centroids come from label sums.
    """
    mask = tumour_mask(seg)
    box = bbox_of(mask)
    if box is None:
        return []
    offset = np.array([lo for lo, _ in box])
    sub = crop(mask, box)
    comps, count = ndimage.label(sub, structure=np.ones((3, 3, 3), dtype=bool))
    voxels = np.bincount(comps.ravel(), minlength=count + 1)[1:]
    centroids = index_to_physical(_mean_indices(comps, count, voxels) + offset, geometry)
    surface = sub & ~ndimage.binary_erosion(sub)
    surf_labels = comps[surface]
    order = np.argsort(surf_labels, kind="stable")
    surf_pts = index_to_physical(np.argwhere(surface)[order] + offset, geometry)
    bounds = np.searchsorted(surf_labels[order], np.arange(1, count + 2))
    vml = voxel_volume_ml(geometry)
    out = []
    for k in range(count):
        diameter = largest_diameter(surf_pts[bounds[k]:bounds[k + 1]])
        out.append({
            "volume_ml": int(voxels[k]) * vml,
            "voxels": int(voxels[k]),
            "largest_diameter_mm": diameter,
            "centroid_lps_mm": [float(v) for v in centroids[k]],
            "size_category": size_category(diameter),
        })
    out.sort(key=lambda t: -t["voxels"])
    for k, t in enumerate(out, start=1):
        t["id"] = k
    return out


def case_report(seg: np.ndarray, geometry: Geometry, *, configuration: str | None = None, folds: Sequence[str] = (),
                version: str | None = None, timings: Mapping[str, float] | None = None, extra: Mapping | None = None) -> dict:
    """The JSON-able report of one predicted case (see the module docstring)."""
    if tuple(seg.shape) != tuple(geometry.shape):
        raise ValueError(f"label map shape {seg.shape} differs from the geometry's {geometry.shape}")
    vml = voxel_volume_ml(geometry)
    liver_voxels = int(np.count_nonzero(liver_mask(seg)))
    tumour_voxels = int(np.count_nonzero(tumour_mask(seg)))
    tumours = tumour_stats(seg, geometry)
    report = {
        "liver_volume_ml": liver_voxels * vml,
        "tumour_volume_ml": tumour_voxels * vml,
        "tumour_count": len(tumours),
        "tumour_burden": tumour_voxels / liver_voxels if liver_voxels else 0.0,
        "tumours": tumours,
        "size_rule": SIZE_RULE,
        "geometry": geometry.to_json(),
        "configuration": configuration,
        "folds": list(folds),
        "autoliver_version": version,
        "runtime_s": {k: round(float(v), 4) for k, v in (timings or {}).items()},
    }
    if extra:
        report.update(extra)
    return report
