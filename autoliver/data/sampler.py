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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RANDOM, FOREGROUND, TUMOUR = 0, 1, 2
LIVER_KEY, TUMOUR_KEY = "1", "2"


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
