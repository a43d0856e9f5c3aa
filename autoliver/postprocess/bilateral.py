"""Fast Gaussian and bilateral (spatial + intensity) filters for the dense CRF, in numpy/scipy.

Both filters are *normalised*: output_i = sum_j k(i, j) v_j / sum_j k(i, j), the sum over
the voxels of the given volume (the kernel is truncated at its border, not padded), with

- spatial kernel   k(i, j) = exp(-|p_i - p_j|^2 / (2 sigma_mm^2)), p in mm;
- bilateral kernel k(i, j) = exp(-|p_i - p_j|^2 / (2 sigma_mm^2) - (I_i - I_j)^2 / (2 sigma_i^2)),
  I in the image's own unit (the CRF passes z-scored CT, so sigma_i is in foreground-std units).

The sum over j includes j = i. A brute-force O(N^2) evaluation of exactly this formula is in
the tests; the fast versions below approximate it.

The spatial filter is a separable Gaussian (scipy.ndimage, zero outside, divided by the
filtered ones). The bilateral filter uses a bilateral grid (Paris & Durand 2006; Chen et al.
2007): the values are splatted onto a coarse 4D grid (z, y, x, intensity) with a sample
spacing of ``GRID_SAMPLING`` sigma (box splat in space over blocks of whole voxels, linear
in intensity), the grid is blurred with a separable Gaussian whose width is reduced by the
variance the splat and the slice add, and the result is sliced back with quadrilinear
interpolation. Cost: O(N) per filter (two bincounts and 8 gathers of (2 x channels) floats
per voxel) plus the blur of a grid about (GRID_SAMPLING^-4 x the voxels per sigma^3) smaller
than the volume. The grid geometry depends only on the image, so a CRF builds it once
(``build_grid``) and filters with it every iteration (``grid_filter``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from autoliver.core.geometry import check_spacing

GRID_SAMPLING = 0.5  # grid sample spacing in units of sigma (spatial and intensity)
TRUNCATE = 3.0  # Gaussian blurs are cut at this many sigmas
_TENT_VAR = 1.0 / 6.0  # variance of linear interpolation / linear splat, in cell units^2


def _check_spacing_sigma(shape: tuple[int, ...], spacing, sigma_mm: float) -> tuple[float, float, float]:
    spacing = check_spacing(spacing)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"volume must be (Z, Y, X) with at least one voxel, got shape {shape}")
    if not (math.isfinite(sigma_mm) and sigma_mm > 0):
        raise ValueError(f"spatial sigma must be a positive number of mm, got {sigma_mm}")
    return spacing


def _as_channels(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float32)
    if values.ndim == 3:
        return values[None]
    if values.ndim != 4:
        raise ValueError(f"values must be (Z, Y, X) or (C, Z, Y, X), got shape {values.shape}")
    return values


def gaussian_filter_mm(values: np.ndarray, spacing, sigma_mm: float) -> np.ndarray:
    """Normalised spatial Gaussian of (C, Z, Y, X) or (Z, Y, X) ``values``; float32, same shape."""
    squeeze = np.asarray(values).ndim == 3
    v = _as_channels(values)
    spacing = _check_spacing_sigma(v.shape[1:], spacing, sigma_mm)
    sig = [sigma_mm / s for s in spacing]
    norm = np.ones((1, 1, 1), dtype=np.float32)
    for axis, (n, sg) in enumerate(zip(v.shape[1:], sig)):
        w = ndimage.gaussian_filter1d(np.ones(n, np.float32), sg, mode="constant", truncate=TRUNCATE)
        norm = norm * w.reshape([-1 if a == axis else 1 for a in range(3)])
    out = np.empty_like(v)
    for c in range(v.shape[0]):
        ndimage.gaussian_filter(v[c], sig, output=out[c], mode="constant", truncate=TRUNCATE)
        out[c] /= norm
    return out[0] if squeeze else out


@dataclass(frozen=True)
class BilateralGrid:
    """Where each voxel splats to and slices from on a bilateral grid (see module doc)."""

    shape: tuple[int, int, int]  # volume (Z, Y, X)
    grid_shape: tuple[int, int, int, int]  # (Zn, Yn, Xn, K) incl. one padding node per side
    block: tuple[int, int, int]  # voxels per spatial grid cell along (z, y, x)
    blur_sigma: tuple[float, float, float, float]  # in grid cells
    splat_index: np.ndarray  # (N,) flat grid index of (block node, lower intensity node)
    slice_index: np.ndarray  # (N,) flat grid index of the lower interpolation corner
    intensity_frac: np.ndarray  # (N,) float32 in [0, 1): weight of the upper intensity node
    axis_weights: tuple[tuple[np.ndarray, int], ...]  # per axis: (lower corner weight, flat index step)
    norm: np.ndarray  # (Z, Y, X) float32: the unnormalised filter of ones


def _axis_geometry(n: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per voxel along one axis: splat node, lower slice node and its weight (padded indices)."""
    i = np.arange(n)
    splat = i // block + 1
    t = (i - (block - 1) / 2.0) / block + 1.0  # position in node units, node c+1 = block c centre
    lo = np.floor(t).astype(np.int64)
    return splat, lo, (1.0 - (t - lo)).astype(np.float32)


def _close_intensity_gaps(k: np.ndarray, first: int, radius: int) -> np.ndarray:
    """Renumber intensity nodes so that no empty run between occupied ones is longer than
    the blur can bridge (``radius`` nodes + the splat/slice neighbour): exact, since nodes
    farther apart never interact, and it keeps the grid small when a few voxels (air, bone,
    metal) lie far from the rest."""
    occupied = np.bincount(k.ravel()) > 0
    occupied[1:] |= occupied[:-1]  # the linear splat/slice also uses node k + 1
    nodes = np.flatnonzero(occupied)
    excess = np.maximum(np.diff(nodes) - (radius + 2), 0)
    if not excess.any():
        return k
    shift = np.zeros(occupied.size, np.int64)
    shift[nodes[1:]] = np.cumsum(excess)
    shift = np.maximum.accumulate(shift)
    return k - shift[k]


def build_grid(image: np.ndarray, spacing, sigma_mm: float, sigma_intensity: float) -> BilateralGrid:
    """Precompute the bilateral grid of a (Z, Y, X) ``image`` for kernel widths
    ``sigma_mm`` (mm) and ``sigma_intensity`` (image units)."""
    image = np.asarray(image, dtype=np.float32)
    spacing = _check_spacing_sigma(image.shape, spacing, sigma_mm)
    if not (math.isfinite(sigma_intensity) and sigma_intensity > 0):
        raise ValueError(f"intensity sigma must be a positive number, got {sigma_intensity}")
    if not np.isfinite(image).all():
        raise ValueError("image contains NaN or infinite values")
    sig_vox = [sigma_mm / s for s in spacing]
    block = tuple(max(1, int(GRID_SAMPLING * sg)) for sg in sig_vox)
    # blur = target variance minus what the box splat ((b^2 - 1) / 12 voxels^2) and the
    # linear slice (b^2 / 6) add; at least a quarter of the target so the grid stays smooth
    blur = []
    for sg, b in zip(sig_vox, block):
        var = sg**2 - (b * b - 1) / 12.0 - b * b * _TENT_VAR
        blur.append(math.sqrt(max(var, 0.25 * sg**2)) / b)
    step = GRID_SAMPLING * sigma_intensity
    blur.append(math.sqrt(max(GRID_SAMPLING**-2 - 2 * _TENT_VAR, 0.25 * GRID_SAMPLING**-2)))
    pad = int(math.ceil(TRUNCATE * blur[3])) + 1
    lo_val = float(image.min())
    u = (image - np.float32(lo_val)) / np.float32(step) + np.float32(pad)
    k = np.floor(u)
    u -= k
    frac = u  # float32 in [0, 1)
    k = _close_intensity_gaps(k.astype(np.int64), pad, int(TRUNCATE * blur[3] + 0.5))
    n_k = int(k.max()) + pad + 2
    geo = [_axis_geometry(n, b) for n, b in zip(image.shape, block)]
    grid_shape = tuple(int(g[0][-1]) + 2 for g in geo) + (n_k,)
    strides = (grid_shape[1] * grid_shape[2] * n_k, grid_shape[2] * n_k, n_k)
    itype = np.int32 if int(np.prod(grid_shape)) < 2**31 - 8 else np.int64
    k = k.astype(itype)

    def flat(which: int) -> np.ndarray:  # k + the flat index of each voxel's splat/slice node
        zyx = [(g[which] * st).astype(itype) for g, st in zip(geo, strides)]
        out = k + zyx[0][:, None, None]
        out += zyx[1][None, :, None]
        out += zyx[2][None, None, :]
        return out.ravel()

    grid = BilateralGrid(
        shape=image.shape, grid_shape=grid_shape, block=block, blur_sigma=tuple(blur),
        splat_index=flat(0), slice_index=flat(1), intensity_frac=frac.ravel(),
        axis_weights=tuple((g[2], int(s)) for g, s in zip(geo, strides)),
        norm=np.empty(0, np.float32),
    )
    norm = grid_filter(grid, np.ones((1,) + image.shape, np.float32), normalise=False)[0]
    return replace(grid, norm=norm)


def grid_filter(grid: BilateralGrid, values: np.ndarray, normalise: bool = True) -> np.ndarray:
    """Bilateral filter of (C, Z, Y, X) ``values`` on a precomputed grid; float32 (C, Z, Y, X)."""
    values = _as_channels(values)
    if values.shape[1:] != grid.shape:
        raise ValueError(f"values have spatial shape {values.shape[1:]}, the grid was built for {grid.shape}")
    n_cells = int(np.prod(grid.grid_shape))
    frac = grid.intensity_frac
    n_c = values.shape[0]
    # splat + blur per channel; store each grid node next to its upper intensity neighbour
    # (one complex64 = (lower, upper)), so one gather brings both intensity corners
    pairs = []
    for c in range(n_c):
        v = values[c].ravel()
        hi = v * frac
        g = np.bincount(grid.splat_index, weights=v - hi, minlength=n_cells)
        g[1:] += np.bincount(grid.splat_index, weights=hi, minlength=n_cells)[:-1]
        g = ndimage.gaussian_filter(g.reshape(grid.grid_shape).astype(np.float32), grid.blur_sigma,
                                    mode="constant", truncate=TRUNCATE).ravel()
        pair = np.zeros((n_cells, 2), np.float32)
        pair[:, 0] = g
        pair[:-1, 1] = g[1:]
        pairs.append(pair.view(np.complex64).ravel())
    # slice: trilinear over the 8 spatial corners, then linear in intensity
    (wz, sz), (wy, sy), (wx, sx) = grid.axis_weights
    n = frac.size
    acc = np.zeros((n_c, n), dtype=np.complex64)
    w = np.empty(n, np.float32)
    for dz in (0, 1):
        for dy in (0, 1):
            wzy = np.outer(wz if dz == 0 else 1 - wz, wy if dy == 0 else 1 - wy)
            for dx in (0, 1):
                np.multiply(wzy[:, :, None], (wx if dx == 0 else 1 - wx)[None, None, :], out=w.reshape(grid.shape))
                idx = grid.slice_index + grid.slice_index.dtype.type(dz * sz + dy * sy + dx * sx)
                for c in range(n_c):
                    t = pairs[c].take(idx)
                    t *= w
                    acc[c] += t
    out = np.empty((n_c, n), dtype=np.float32)
    for c in range(n_c):
        lo, hi = acc[c].real, acc[c].imag
        np.subtract(hi, lo, out=out[c])
        out[c] *= frac
        out[c] += lo
    out = out.reshape((n_c,) + grid.shape)
    if normalise:
        out /= np.maximum(grid.norm, np.float32(1e-20))
    return out


def bilateral_filter(values: np.ndarray, image: np.ndarray, spacing, sigma_mm: float, sigma_intensity: float) -> np.ndarray:
    """Normalised bilateral filter of (C, Z, Y, X) or (Z, Y, X) ``values`` guided by the
    (Z, Y, X) ``image``; float32, the shape of ``values``."""
    squeeze = np.asarray(values).ndim == 3
    v = _as_channels(values)
    if np.shape(image) != v.shape[1:]:
        raise ValueError(f"image shape {np.shape(image)} does not match values' spatial shape {v.shape[1:]}")
    out = grid_filter(build_grid(image, spacing, sigma_mm, sigma_intensity), v)
    return out[0] if squeeze else out
