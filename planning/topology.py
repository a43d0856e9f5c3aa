"""U-Net topology from a patch size and a voxel spacing (the nnU-Net rules, written anew).

Axis order (z, y, x) for 3D, (y, x) for 2D. A topology is a list of stages; stage 0 works at
the patch resolution (stride 1) and every later stage downsamples by its stride (2 along the
axes that are pooled, 1 elsewhere).

Rules, applied stage by stage while walking down the encoder:

* An axis may be pooled while its feature map stays >= ``min_feature_map`` voxels after
  pooling (so the bottleneck is >= 4 voxels wide wherever the patch allows), and while it has
  been pooled fewer than ``max_pools`` times.
* Anisotropy: only axes whose current spacing is within 2x of the finest current spacing are
  pooled. A coarse (thick-slice) axis is left alone until pooling the fine axes has brought
  their spacing up to it; then all are pooled together.
* If only a single axis could be pooled, it must be at least 3x ``min_feature_map`` long,
  otherwise pooling stops (one-axis pooling of a short axis gives a poor bottleneck).
* Kernel size 3 along an axis once its spacing is within 2x of the finest one, 1 before that
  (a 3-wide kernel across thick slices mixes tissue that is far apart); the bottleneck always
  uses 3.
* Features: ``base_features`` doubling per stage, capped at ``max_features`` (320 for 3D,
  512 for 2D).
* The patch is rounded up to a multiple of the total stride along each axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_FEATURE_MAP = 4
BASE_FEATURES = 32
MAX_FEATURES_3D = 320
MAX_FEATURES_2D = 512
MAX_POOLS_3D = 5  # 6 stages: a 128 voxel axis ends at a 4 voxel bottleneck
MAX_POOLS_2D = 6  # 7 stages: a 512 pixel axis ends at an 8 pixel bottleneck


@dataclass(frozen=True)
class Topology:
    patch_size: tuple[int, ...]
    strides: tuple[tuple[int, ...], ...]  # per stage, the first all ones
    kernel_sizes: tuple[tuple[int, ...], ...]  # per stage
    features_per_stage: tuple[int, ...]

    @property
    def n_stages(self) -> int:
        return len(self.strides)

    @property
    def dims(self) -> int:
        return len(self.patch_size)

    @property
    def divisor(self) -> tuple[int, ...]:
        """Product of the strides along each axis: the patch must be a multiple of it."""
        return tuple(math.prod(s[a] for s in self.strides) for a in range(self.dims))

    def stage_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Feature map size (voxels per axis) at each stage."""
        shapes, cur = [], list(self.patch_size)
        for stride in self.strides:
            cur = [c // s for c, s in zip(cur, stride)]
            shapes.append(tuple(cur))
        return tuple(shapes)


def _pooling_plan(patch: list[float], spacing: list[float], min_feature_map: int, max_pools: int):
    dims = len(patch)
    size, sp = list(patch), list(spacing)
    pools = [0] * dims
    kernel = [1] * dims
    strides: list[tuple[int, ...]] = [(1,) * dims]
    kernels: list[tuple[int, ...]] = []
    while True:
        axes = [a for a in range(dims) if size[a] >= 2 * min_feature_map and pools[a] < max_pools]
        if not axes:
            break
        finest = min(sp[a] for a in axes)
        axes = [a for a in axes if sp[a] / finest < 2]
        if len(axes) == 1 and size[axes[0]] < 3 * min_feature_map:
            break
        if not axes:
            break
        finest_all = min(sp)
        kernel = [3 if kernel[a] == 3 or sp[a] / finest_all < 2 else 1 for a in range(dims)]
        kernels.append(tuple(kernel))
        stride = tuple(2 if a in axes else 1 for a in range(dims))
        for a in axes:
            pools[a] += 1
            sp[a] *= 2
            size[a] = math.ceil(size[a] / 2)
        strides.append(stride)
    kernels.append((3,) * dims)  # bottleneck
    return strides, kernels, pools


def compute_topology(
    patch_size: tuple[int, ...] | list[int],
    spacing: tuple[float, ...] | list[float],
    max_pools: int | None = None,
    min_feature_map: int = MIN_FEATURE_MAP,
    base_features: int = BASE_FEATURES,
    max_features: int | None = None,
) -> Topology:
    """The U-Net topology for ``patch_size`` at ``spacing`` (see the module docstring).

    The returned topology's ``patch_size`` is ``patch_size`` rounded up to the total stride.
    """
    dims = len(patch_size)
    if dims not in (2, 3) or len(spacing) != dims:
        raise ValueError(f"patch_size {patch_size} and spacing {spacing} must both have 2 or 3 entries")
    if min(patch_size) < 1 or min(spacing) <= 0:
        raise ValueError(f"patch_size {patch_size} and spacing {spacing} must be positive")
    if max_pools is None:
        max_pools = MAX_POOLS_3D if dims == 3 else MAX_POOLS_2D
    if max_features is None:
        max_features = MAX_FEATURES_3D if dims == 3 else MAX_FEATURES_2D
    strides, kernels, pools = _pooling_plan([float(p) for p in patch_size], [float(s) for s in spacing], min_feature_map, max_pools)
    divisor = [2**p for p in pools]
    padded = tuple(int(math.ceil(p / d) * d) for p, d in zip(patch_size, divisor))
    features = tuple(min(base_features * 2**i, max_features) for i in range(len(strides)))
    return Topology(padded, tuple(strides), tuple(kernels), features)


def shrink_axis(patch_size: tuple[int, ...], axis: int, spacing: tuple[float, ...], **kwargs) -> Topology:
    """The next smaller valid patch along ``axis``: one topology divisor step down.

    The divisor is recomputed for the shrunk size first, so that sizes such as 224 (7 x 32)
    are not skipped when going down from 256 with a divisor of 64.
    """
    current = compute_topology(patch_size, spacing, **kwargs)
    trial = list(current.patch_size)
    trial[axis] = max(1, trial[axis] - current.divisor[axis])
    step = compute_topology(trial, spacing, **kwargs).divisor[axis]
    smaller = list(current.patch_size)
    smaller[axis] = max(1, smaller[axis] - step)
    return compute_topology(smaller, spacing, **kwargs)
