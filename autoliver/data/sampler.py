"""Where to cut a training patch from a preprocessed case, and reading it (padded) from storage.

Array layout (Z, Y, X) in the preprocessed grid. A sample is one of three kinds:

- ``RANDOM``: a patch uniformly placed in the volume (it may overhang the volume by at most
  what the patch needs when it is larger than the volume, like nnU-Net);
- ``FOREGROUND``: centred on a voxel drawn from the case's precomputed liver locations
  (``props["class_locations"]["1"]``; tumour locations when the case lists no liver);
- ``TUMOUR``: centred on a voxel of one tumour COMPONENT drawn uniformly among the case's
  components (``props["tumour_components"]["locations"]``), so that a 5-voxel metastasis is
  chosen as often as a 50,000-voxel one. Drawing voxels from the pooled tumour locations would
  pick components in proportion to their volume and almost never show small tumours.

Per batch, at least ``oversample_foreground`` of the samples are forced to a foreground
centre (the last ``ceil(share * B)`` samples; with B = 1 a Bernoulli draw, since a fixed
count would be all or nothing); a forced sample of a case with tumour is a ``TUMOUR`` sample
with probability ``tumour_share``. Only the patch region is read from the blosc2 arrays.

ROI restriction (a two-stage design's tumour stage, ``LiverRoi``): each sample draws a box,
the liver's bounding box (labels 1 + 2 of the ground truth, ``liver_bbox``) grown by
``margin_mm`` and then each face moved by a uniform random amount in +-``jitter_mm``
(``jittered_box``; converted to voxels with the case's spacing and clipped to the volume).
The patch's centre voxel (``start + size // 2``) lies inside that box (``roi_patch_start``),
so the patch overlaps it; foreground and tumour centres are drawn among the locations inside
the box (``CaseIndex.within``). A case without liver is sampled from the whole volume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from autoliver.core.geometry import check_spacing, margin_voxels
from autoliver.core.labels import STRUCTURES

RANDOM, FOREGROUND, TUMOUR = 0, 1, 2
LIVER_KEY, TUMOUR_KEY = "1", "2"
LIVER_LABELS = STRUCTURES["liver"]  # the liver structure: liver and tumour
BBOX_SLAB = 16  # slices decoded at a time when finding the liver's box

Box = tuple[tuple[int, int], ...]  # half-open (lo, hi) per axis, (z, y, x)


@dataclass(frozen=True)
class LiverRoi:
    """Sample a case's patches around its liver: the liver's bounding box (labels 1 + 2 of
    the ground truth) plus ``margin_mm`` on every side, each face moved per sample by a
    uniform random amount in +-``jitter_mm`` (None: half the margin)."""

    margin_mm: float
    jitter_mm: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(float(self.margin_mm)) and float(self.margin_mm) >= 0):
            raise ValueError(f"LiverRoi: margin_mm must be a finite number >= 0, got {self.margin_mm}")
        if self.jitter_mm is not None and not (math.isfinite(float(self.jitter_mm)) and float(self.jitter_mm) >= 0):
            raise ValueError(f"LiverRoi: jitter_mm must be a finite number >= 0 (or None), got {self.jitter_mm}")

    @property
    def jitter(self) -> float:
        """The jitter in mm (half the margin when not given)."""
        return 0.5 * float(self.margin_mm) if self.jitter_mm is None else float(self.jitter_mm)


@dataclass(frozen=True)
class CaseIndex:
    """Sampling locations of one preprocessed case (voxel coordinates (z, y, x), int32)."""

    case_id: str
    shape: tuple[int, int, int]
    foreground: np.ndarray  # (N, 3) liver locations (tumour ones when there is no liver)
    components: tuple[np.ndarray, ...]  # per tumour component, (n_k, 3)

    @property
    def has_tumour(self) -> bool:
        return len(self.components) > 0

    def within(self, box: Box) -> "CaseIndex":
        """The locations inside ``box`` (tumour components keep their voxels inside it; a
        component with none left is dropped)."""
        lo = np.asarray([a for a, _ in box], dtype=np.int64)
        hi = np.asarray([b for _, b in box], dtype=np.int64)

        def keep(a: np.ndarray) -> np.ndarray:
            return a[np.all((a >= lo) & (a < hi), axis=1)] if len(a) else a

        comps = tuple(c for c in (keep(c) for c in self.components) if len(c))
        return CaseIndex(self.case_id, self.shape, keep(self.foreground), comps)

    @classmethod
    def from_properties(cls, case_id: str, props: dict, shape: Sequence[int]) -> "CaseIndex":
        locs = props.get("class_locations") or {}

        def arr(v) -> np.ndarray:
            a = np.asarray(v if v is not None else [], dtype=np.int32)
            return a.reshape(-1, 3)

        fg = arr(locs.get(LIVER_KEY))
        if not len(fg):
            fg = arr(locs.get(TUMOUR_KEY))
        comps = tuple(a for a in (arr(c) for c in (props.get("tumour_components") or {}).get("locations", [])) if len(a))
        return cls(case_id, tuple(int(s) for s in shape), fg, comps)


def n_forced(batch_size: int, share: float, rng: np.random.Generator) -> int:
    """How many samples of a batch are forced to foreground: ``ceil(share * B)`` (Bernoulli for B = 1)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"oversample_foreground must lie in [0, 1], got {share}")
    if batch_size == 1:
        return int(rng.random() < share)
    return min(batch_size, math.ceil(share * batch_size - 1e-9))


def choose_kind(index: CaseIndex, forced: bool, tumour_share: float, rng: np.random.Generator) -> int:
    """RANDOM, FOREGROUND or TUMOUR for one sample of ``index``'s case."""
    if not forced:
        return RANDOM
    if index.has_tumour and rng.random() < tumour_share:
        return TUMOUR
    if len(index.foreground):
        return FOREGROUND
    return TUMOUR if index.has_tumour else RANDOM


def available_kind(index: CaseIndex, kind: int) -> int:
    """``kind`` if ``index`` has locations for it, else the next one that has (TUMOUR ->
    FOREGROUND -> RANDOM); for an index restricted to a box."""
    if kind == TUMOUR and not index.has_tumour:
        kind = FOREGROUND
    if kind == FOREGROUND and not len(index.foreground):
        kind = TUMOUR if index.has_tumour else RANDOM
    return kind


def choose_centre(index: CaseIndex, kind: int, rng: np.random.Generator) -> np.ndarray | None:
    """A voxel (z, y, x) to centre the patch on, or None for a random placement."""
    if kind == TUMOUR:
        comp = index.components[int(rng.integers(len(index.components)))]
        return comp[int(rng.integers(len(comp)))].astype(np.int64)
    if kind == FOREGROUND:
        return index.foreground[int(rng.integers(len(index.foreground)))].astype(np.int64)
    return None


def patch_start(shape: Sequence[int], size: Sequence[int], centre: Sequence[int] | None, rng: np.random.Generator) -> np.ndarray:
    """Start corner of a patch of ``size`` in a volume of ``shape`` (per axis, any number of axes).

    Bounds as in nnU-Net: a patch larger than the volume along an axis overhangs it by half
    the excess on each side; otherwise it stays inside. With a ``centre`` the patch is centred
    there and then clipped to these bounds (the voxel stays inside the patch); without, the
    start is uniform within them.
    """
    shape, size = np.asarray(shape, dtype=np.int64), np.asarray(size, dtype=np.int64)
    need = np.maximum(size - shape, 0)
    lo = -(need // 2)
    hi = shape + need // 2 + need % 2 - size
    if centre is None:
        return np.array([int(rng.integers(a, b + 1)) for a, b in zip(lo, hi)], dtype=np.int64)
    return np.clip(np.asarray(centre, dtype=np.int64) - size // 2, lo, hi)


def read_region(array, start: Sequence[int], size: Sequence[int], pad_value: float, clamp_axes: Sequence[int] = ()) -> np.ndarray:
    """``array[start : start + size]`` (Z, Y, X), reading only the region; outside the volume
    filled with ``pad_value``, except along ``clamp_axes`` where the edge slices are repeated
    (2.5d: a stack of slices near the volume's end repeats its last slice)."""
    shape = tuple(int(s) for s in array.shape)
    start = [int(v) for v in start]
    size = [int(v) for v in size]
    if any(n <= 0 for n in size):
        raise ValueError(f"region size must be positive, got {size}")
    lo = [min(max(a, 0), s) for a, s in zip(start, shape)]
    hi = [min(max(a + n, 0), s) for a, n, s in zip(start, size, shape)]
    for ax in clamp_axes:  # read the clamped range, then index it
        lo[ax] = min(max(start[ax], 0), shape[ax] - 1)
        hi[ax] = max(min(start[ax] + size[ax], shape[ax]), lo[ax] + 1)
    dtype = np.dtype(array.dtype)
    if any(h <= l for l, h in zip(lo, hi)):
        return np.full(size, pad_value, dtype=dtype)
    sub = np.asarray(array[tuple(slice(l, h) for l, h in zip(lo, hi))])
    for ax in clamp_axes:
        idx = np.clip(np.arange(start[ax], start[ax] + size[ax]), 0, shape[ax] - 1) - lo[ax]
        sub = np.take(sub, idx, axis=ax)
    if list(sub.shape) == size:
        return np.ascontiguousarray(sub)
    out = np.full(size, pad_value, dtype=dtype)
    dst = tuple(slice(0, size[ax]) if ax in clamp_axes else slice(lo[ax] - start[ax], hi[ax] - start[ax]) for ax in range(len(size)))
    out[dst] = sub
    return out


def liver_bbox(seg, labels: Sequence[int] = LIVER_LABELS, slab: int = BBOX_SLAB) -> Box | None:
    """Exact bounding box (half-open, (z, y, x)) of the voxels of ``seg`` holding one of
    ``labels``, reading ``slab`` slices at a time (a blosc2 array is never decoded whole);
    None when there are none."""
    shape = tuple(int(s) for s in seg.shape)
    z_hit: list[int] = []
    y_any = np.zeros(shape[1], dtype=bool)
    x_any = np.zeros(shape[2], dtype=bool)
    for z0 in range(0, shape[0], slab):
        mask = np.isin(np.asarray(seg[z0 : z0 + slab]), labels)
        rows = mask.any(axis=(1, 2))
        if not rows.any():
            continue
        z_hit.extend(int(z0 + i) for i in np.flatnonzero(rows))
        y_any |= mask.any(axis=(0, 2))
        x_any |= mask.any(axis=(0, 1))
    if not z_hit:
        return None
    ys, xs = np.flatnonzero(y_any), np.flatnonzero(x_any)
    return ((z_hit[0], z_hit[-1] + 1), (int(ys[0]), int(ys[-1]) + 1), (int(xs[0]), int(xs[-1]) + 1))


def jittered_box(bbox: Box, shape: Sequence[int], spacing: Sequence[float], margin_mm: float, jitter_mm: float,
                 rng: np.random.Generator) -> Box:
    """``bbox`` grown by the margin on every side, then each of its 6 faces moved by a uniform
    random amount in [-``jitter_mm``, +``jitter_mm``] (one draw of 6 numbers from ``rng``).

    In voxels of ``spacing`` (z, y, x) mm: the margin is ``ceil(margin_mm / spacing)`` (the
    box inference uses), a face's move ``rint(u * jitter_mm / spacing)`` with u uniform in
    [-1, 1] (symmetric: as often in as out). The box is clipped to the volume ``shape`` and
    keeps at least one voxel along each axis.
    """
    spacing = np.asarray(check_spacing(spacing), dtype=np.float64)
    move = np.rint(rng.uniform(-1.0, 1.0, size=(2, 3)) * (float(jitter_mm) / spacing)).astype(np.int64)
    margin = np.asarray(margin_voxels(spacing, margin_mm), dtype=np.int64)
    out = []
    for axis in range(3):
        (a, b), n = bbox[axis], int(shape[axis])
        lo = max(int(a - margin[axis] + move[0, axis]), 0)
        hi = min(int(b + margin[axis] + move[1, axis]), n)
        if hi <= lo:  # a jitter larger than the margin closed the box: keep the liver box's middle voxel
            lo = min(max((a + b - 1) // 2, 0), n - 1)
            hi = lo + 1
        out.append((lo, hi))
    return tuple(out)


def roi_patch_start(shape: Sequence[int], size: Sequence[int], box: Sequence[Sequence[int]], centre: Sequence[int] | None,
                    rng: np.random.Generator) -> np.ndarray:
    """Start corner of a patch whose centre voxel (``start + size // 2``) lies in ``box`` (per
    axis, half-open, same axes as ``shape``). Within that, the start keeps to
    ``patch_start``'s bounds (the patch inside the volume) where the box allows; where it
    does not (a box at the volume's edge), the patch overhangs the volume as little as the
    box allows. With a ``centre`` (a voxel inside ``box``) the patch is centred there and
    clipped to these bounds (the voxel stays inside the patch); without, the start is
    uniform within them."""
    shape, size = np.asarray(shape, dtype=np.int64), np.asarray(size, dtype=np.int64)
    need = np.maximum(size - shape, 0)
    lo = -(need // 2)
    hi = shape + need // 2 + need % 2 - size
    half = size // 2
    c_lo = np.asarray([int(a) for a, _ in box], dtype=np.int64) - half
    c_hi = np.asarray([int(b) for _, b in box], dtype=np.int64) - 1 - half
    if np.any(c_hi < c_lo):
        raise ValueError(f"empty box {list(box)}")
    s_lo, s_hi = np.maximum(lo, c_lo), np.minimum(hi, c_hi)
    empty = s_lo > s_hi
    nearest = np.where(c_lo > hi, c_lo, c_hi)  # no overlap: the box-allowed start closest to the volume's bounds
    s_lo, s_hi = np.where(empty, nearest, s_lo), np.where(empty, nearest, s_hi)
    if centre is None:
        return np.array([int(rng.integers(a, b + 1)) for a, b in zip(s_lo, s_hi)], dtype=np.int64)
    return np.clip(np.asarray(centre, dtype=np.int64) - half, s_lo, s_hi)
