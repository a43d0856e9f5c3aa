"""Overlays of liver and tumour on CT, for the HTML report: pure functions over arrays.

Conventions (radiological display, whatever the storage order of the file):

- axial: seen from the feet, patient's right on the image's left, anterior at the top;
- coronal: seen from the front, patient's right on the left, head at the top;
- sagittal: seen from the patient's left, anterior on the left, head at the top.

The array's axes are matched to the patient's axes through the image's direction matrix
(the nearest axis-aligned orientation; an oblique scan is shown in that nearest one). All of
this is done with numpy views, so only the three displayed slices are ever copied out of a
large volume. Each slice is resampled for display (``skimage.transform.resize``) so that a pixel
is square in millimetres (the aspect follows the spacing): CT bilinear, labels nearest neighbour.

The CT is shown in an abdominal window (width 400 HU, level 50 HU by default). Liver and
tumour are semi-transparent fills with an opaque outline; colours are from the Okabe-Ito
palette, which stays distinct for colour-blind readers.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.transform import resize

from autoliver.io.images import Geometry

log = logging.getLogger(__name__)

WINDOW_WIDTH_HU, WINDOW_LEVEL_HU = 400.0, 50.0
LIVER_RGB = (0, 158, 115)  # bluish green
TUMOUR_RGB = (213, 94, 0)  # vermillion
FILL_ALPHA = 0.35
VIEWS = ("axial", "coronal", "sagittal")
COUNT_SLAB = 32  # slices per chunk when counting labelled voxels (bounded memory)


@dataclass(frozen=True)
class Orientation:
    """How the array (Z, Y, X) maps onto the patient axes (superior, posterior, left).

    ``perm[c]`` is the array axis along patient axis ``c`` (0 S, 1 P, 2 L); ``flip[c]`` is
    True where that array axis runs the other way (towards inferior, anterior or right).
    """

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]


@dataclass(frozen=True)
class View:
    """One rendered slice: ``index`` is the slice's index along the array axis it cuts."""

    name: str  # axial, coronal or sagittal
    index: int
    count: int  # slices along that axis
    png: bytes
    width: int
    height: int


def window(hu: np.ndarray, width: float = WINDOW_WIDTH_HU, level: float = WINDOW_LEVEL_HU) -> np.ndarray:
    """HU -> float32 grey in [0, 1]: level - width/2 is black, level + width/2 white."""
    if not width > 0:
        raise ValueError(f"window width must be > 0 HU, got {width}")
    lo = level - width / 2.0
    return np.clip((np.asarray(hu, dtype=np.float32) - np.float32(lo)) / np.float32(width), 0.0, 1.0)


def orientation(direction: Sequence[float]) -> Orientation:
    """The array -> patient axis mapping of a SimpleITK direction (3x3 row-major, LPS)."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    perm, flip = [0, 0, 0], [False, False, False]
    seen = set()
    for a in range(3):  # array axis a (z, y, x order) is index axis j = 2 - a of SimpleITK
        column = d[:, 2 - a]
        p = int(np.argmax(np.abs(column)))  # physical axis x, y, z -> patient axis c = 2 - p
        c = 2 - p
        seen.add(c)
        perm[c], flip[c] = a, bool(column[p] < 0)
    if len(seen) != 3:
        log.warning("direction %s is too oblique to display; showing the array as stored", list(direction))
        return Orientation((0, 1, 2), (False, False, False))
    return Orientation(tuple(perm), tuple(flip))


def canonical(volume: np.ndarray, orient: Orientation) -> np.ndarray:
    """A view (no copy) of (Z, Y, X) ``volume`` with axes (S, P, L), each increasing."""
    view = np.transpose(volume, orient.perm)
    return view[tuple(slice(None, None, -1) if f else slice(None) for f in orient.flip)]


def plane_counts(seg: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Tumour (label 2) and liver (labels 1, 2) voxels per slice along each array axis
    (z, y, x), counted in slabs so that no full-size mask is ever made."""
    counts = {k: [np.zeros(n, dtype=np.int64) for n in seg.shape] for k in ("tumour", "liver")}
    for z0 in range(0, seg.shape[0], COUNT_SLAB):
        slab = seg[z0:z0 + COUNT_SLAB]
        tumour = slab == 2
        for name, mask in (("tumour", tumour), ("liver", tumour | (slab == 1))):
            per_z = np.count_nonzero(mask, axis=(1, 2))
            if not per_z.any():
                continue
            counts[name][0][z0:z0 + slab.shape[0]] = per_z
            counts[name][1] += np.count_nonzero(mask, axis=(0, 2))
            counts[name][2] += np.count_nonzero(mask, axis=(0, 1))
    return {k: (v[0], v[1], v[2]) for k, v in counts.items()}


def choose_slices(segs: Sequence[np.ndarray], orient: Orientation) -> tuple[int, int, int]:
    """Canonical (S, P, L) indices of the axial, coronal and sagittal slices to show.

    Per view, the slice with the most tumour (label 2) summed over ``segs`` (e.g. prediction
    and reference, so a missed tumour is shown too); without tumour, the one with the most
    liver (labels 1, 2); without either, the middle slice.
    """
    if not segs:
        raise ValueError("choose_slices needs at least one label map")
    shape = segs[0].shape
    total = {k: [np.zeros(n, dtype=np.int64) for n in shape] for k in ("tumour", "liver")}
    for seg in segs:
        if seg.shape != shape:
            raise ValueError(f"label maps differ in shape: {seg.shape} and {shape}")
        for name, per_axis in plane_counts(seg).items():
            for a, counts in enumerate(per_axis):
                total[name][a] += counts
    chosen = []
    for c in range(3):
        a = orient.perm[c]
        n = shape[a]
        for counts in (total["tumour"][a], total["liver"][a]):
            if counts.any():
                index = int(np.argmax(counts))
                break
        else:
            index = n // 2
        chosen.append(n - 1 - index if orient.flip[c] else index)
    return chosen[0], chosen[1], chosen[2]


def extract(volume: np.ndarray, orient: Orientation, spacing: Sequence[float], view: str, index: int) -> tuple[np.ndarray, tuple[float, float]]:
    """One display slice (rows, cols) of ``volume`` at canonical ``index`` and its pixel size
    (row mm, col mm), in the orientation given in the module docstring."""
    c = canonical(volume, orient)
    sp = [float(spacing[a]) for a in orient.perm]  # (S, P, L) mm
    if view == "axial":
        return np.array(c[index, :, :]), (sp[1], sp[2])
    if view == "coronal":
        return np.array(c[::-1, index, :]), (sp[0], sp[2])
    if view == "sagittal":
        return np.array(c[::-1, :, index]), (sp[0], sp[1])
    raise ValueError(f"view must be one of {VIEWS}, got {view!r}")


def display_shape(shape: tuple[int, int], pixel_mm: tuple[float, float], max_px: int) -> tuple[int, int]:
    """(rows, cols) on screen with square pixels and the longer side ``max_px``."""
    h_mm, w_mm = shape[0] * pixel_mm[0], shape[1] * pixel_mm[1]
    scale = max_px / max(h_mm, w_mm)
    return max(1, int(round(h_mm * scale))), max(1, int(round(w_mm * scale)))


def compose(grey: np.ndarray, labels: np.ndarray | None, alpha: float = FILL_ALPHA) -> np.ndarray:
    """Grey [0, 1] (rows, cols) + label map -> RGB uint8 with filled, outlined liver and tumour."""
    rgb = np.repeat((grey * 255.0)[..., None], 3, axis=2)
    if labels is not None:
        liver, tumour = labels > 0, labels == 2
        for mask, fill, colour in ((liver, liver & ~tumour, LIVER_RGB), (tumour, tumour, TUMOUR_RGB)):
            if not mask.any():
                continue
            rgb[fill] = (1 - alpha) * rgb[fill] + alpha * np.asarray(colour, dtype=np.float64)
            rgb[mask & ~ndimage.binary_erosion(mask)] = colour
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    """An RGB uint8 (rows, cols, 3) array as PNG bytes."""
    from matplotlib.image import imsave

    buf = io.BytesIO()
    imsave(buf, rgb, format="png", metadata={"Software": None})
    return buf.getvalue()


def render(ct: np.ndarray, labels: np.ndarray | None, pixel_mm: tuple[float, float], max_px: int = 320,
           width: float = WINDOW_WIDTH_HU, level: float = WINDOW_LEVEL_HU) -> np.ndarray:
    """One HU slice and its labels -> RGB uint8 at display size (square pixels)."""
    out = display_shape(ct.shape, pixel_mm, max_px)
    # pixel centre onto pixel centre, edges clamped, no smoothing: CT bilinear, labels nearest neighbour
    grey = resize(window(ct, width, level), out, order=1, mode="edge", anti_aliasing=False, preserve_range=True)
    lab = resize(labels, out, order=0, mode="edge", anti_aliasing=False, preserve_range=True) if labels is not None else None
    return compose(grey, lab)


def case_views(image: np.ndarray, geometry: Geometry, rows: Sequence[np.ndarray | None], max_px: int = 320) -> list[list[View]]:
    """For each label map in ``rows`` (None: CT alone), its axial, coronal and sagittal views at
    the same slices, chosen by ``choose_slices`` over every given label map."""
    if tuple(image.shape) != tuple(geometry.shape):
        raise ValueError(f"image shape {image.shape} differs from its geometry's {geometry.shape}")
    for seg in rows:
        if seg is not None and seg.shape != image.shape:
            raise ValueError(f"label map shape {seg.shape} differs from the image's {image.shape}")
    orient = orientation(geometry.direction)
    given = [s for s in rows if s is not None]
    indices = choose_slices(given, orient) if given else tuple(image.shape[a] // 2 for a in orient.perm)
    out = []
    for seg in rows:
        views = []
        for c, name in enumerate(VIEWS):
            ct, pixel_mm = extract(image, orient, geometry.spacing, name, indices[c])
            lab = extract(seg, orient, geometry.spacing, name, indices[c])[0] if seg is not None else None
            rgb = render(ct, lab, pixel_mm, max_px)
            a = orient.perm[c]
            stored = image.shape[a] - 1 - indices[c] if orient.flip[c] else indices[c]
            views.append(View(name, int(stored), int(image.shape[a]), png_bytes(rgb), rgb.shape[1], rgb.shape[0]))
        out.append(views)
    return out
