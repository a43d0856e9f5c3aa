"""nnU-Net v2's sliding-window tiling and importance weights, for ``autoliver.infer.sliding_window``.

Tile starts: ``ceil((n - p) / (step * p)) + 1`` positions per axis, spread evenly over
[0, n - p] and rounded (numpy's round half to even), on the image padded to at least the patch
(zero padding, centred). Weights: per axis, a unit impulse at ``p // 2`` smoothed by a
Gaussian of sigma ``p / 8`` (truncated at 4 sigma, zero outside); their outer product is
nnU-Net's importance map up to a constant factor, which the weighted mean cancels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter1d


def tile_starts(size: int, patch: int, step: float) -> list[int]:
    if size <= patch:
        return [0]
    n = int(math.ceil((size - patch) / (patch * step))) + 1
    stride = (size - patch) / (n - 1)
    return [int(np.round(stride * i)) for i in range(n)]


def starts_for(shape: Sequence[int], patch: Sequence[int], step: float) -> list[list[int]]:
    """Tile starts per axis for an image of ``shape`` (padded to the patch where smaller)."""
    return [tile_starts(max(int(s), int(p)), int(p), step) for s, p in zip(shape, patch)]


def axis_weights(patch: Sequence[int], sigma_scale: float = 1.0 / 8) -> tuple[tuple[float, ...], ...]:
    out = []
    for p in patch:
        impulse = np.zeros(int(p))
        impulse[int(p) // 2] = 1.0
        g = gaussian_filter1d(impulse, int(p) * sigma_scale, order=0, mode="constant", cval=0.0)
        g = g / g.max()
        g[g == 0] = g[g > 0].min()
        out.append(tuple(float(v) for v in g))
    return tuple(out)
