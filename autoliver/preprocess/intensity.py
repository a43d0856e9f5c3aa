"""Voxel-value preprocessing options of derived data folders (``plans.data_preprocessing``).

Small pure functions, (Z, Y, X) array in, new float32 array out (the input is never
modified), and ``apply_options``, which runs them in this order on an image already in its
target grid (in HU, except for a planned identifier, see below):

1. ``smooth``: Gaussian smoothing, ``gaussian_sigma_voxels`` in voxels of the target grid on
   every axis (scipy.ndimage.gaussian_filter, border replicated: mode "nearest");
2. the intensity mapping, ``intensity``:
   "ct" (default) = the plan's CT normalisation (``normalise_ct``: clip, then (x - mean) / std);
   "window" = ``window``: clip to ``window_hu`` [low, high] and scale linearly to [0, 1];
   "zscore_image" = ``zscore``: (x - mean) / std with mean and std of this image over the body
   (``body_mask``; the caller passes the voxels above ``planning.crop.BODY_THRESHOLD_HU`` in the
   target grid, before smoothing), or over the whole cropped volume when there is no mask;
3. ``equalise_histogram`` (``histogram_equalisation``): skimage.exposure.equalize_hist over the
   whole volume (256 bins), its lowest level then moved to 0 as the classic / OpenCV formula
   (cdf - cdf_min) / (n - cdf_min) does, so the result spans exactly [0, 1] and air stays 0;
4. ``clahe_slices`` (``clahe``: {"clip_limit", optional "kernel_size"}):
   skimage.exposure.equalize_adapthist on each axial (Y, X) slice (256 bins); input outside
   [0, 1] is first scaled to [0, 1] over the volume; a constant slice gives 0 (skimage would
   give 1, making an all-air slice white). skimage stretches each slice's result to [0, 1].

In ``autoliver.preprocess.case`` a derived identifier is cropped, resampled in HU to its
target spacing, then given to ``apply_options``; a planned identifier (no options) goes
through ``apply_options(cropped, {}, norm)`` = ``normalise_ct`` before resampling, exactly as
before options existed. ``pad_value_for`` (normalise.py) says what each option set maps air to.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import ndimage
from skimage import exposure

from autoliver.preprocess.normalise import normalise_ct
from planning.hashing import hash_json
from planning.plans import Normalisation, Plans

HIST_BINS = 256  # equalize_hist / equalize_adapthist bins (8-bit grey levels, as the papers' images)
GAUSSIAN_MODE = "nearest"  # border handling of the smoothing (replicate, as the resampling)
CHUNK_VOXELS = 4 * 1024 * 1024  # float64 temporaries of the equalisation: 32 MB
NO_OPTIONS_HASH = hash_json({})  # what a planned identifier's (or an old) data folder records


def _f32(image: np.ndarray) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


def smooth(image: np.ndarray, sigma_voxels: float | tuple[float, float, float]) -> np.ndarray:
    """Gaussian smoothing with sigma in voxels (scalar: the same on every axis); float32."""
    x = _f32(image)
    if np.all(np.asarray(sigma_voxels, dtype=float) == 0):
        return x.copy()
    return ndimage.gaussian_filter(x, sigma_voxels, mode=GAUSSIAN_MODE)


def window(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to [low, high] (HU) and scale linearly to [0, 1]: (clip(x) - low) / (high - low)."""
    low, high = float(low), float(high)
    if not low < high:
        raise ValueError(f"window needs low < high, got [{low}, {high}]")
    out = np.clip(_f32(image), np.float32(low), np.float32(high))
    out -= np.float32(low)
    out /= np.float32(high - low)
    return out


def zscore(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """(x - mean) / std, mean and std (float64) over ``mask`` (the whole volume when None or
    empty); a constant region gives std 1 (the image is only shifted)."""
    x = _f32(image)
    if mask is not None and mask.shape != x.shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {x.shape}")
    values = x[mask] if mask is not None and mask.any() else x
    if values.size == 0:
        return x.copy()
    mean = float(values.mean(dtype=np.float64))
    std = float(values.std(dtype=np.float64))
    std = std if std > 0 else 1.0
    return ((x - np.float32(mean)) / np.float32(std)).astype(np.float32, copy=False)


def equalise_histogram(image: np.ndarray, nbins: int = HIST_BINS) -> np.ndarray:
    """skimage.exposure.equalize_hist over the whole volume, lowest level moved to 0 (result
    exactly [0, 1], the minimum -- air after windowing -- at 0).

    The same computation as equalize_hist (skimage's cumulative distribution of the float32
    volume, np.interp at the bin centres), done in slabs of ``CHUNK_VOXELS`` so that no
    float64 copy of the whole volume is made."""
    x = _f32(image)
    out = np.zeros(x.shape, dtype=np.float32)
    if x.size == 0:
        return out
    cdf, centres = exposure.cumulative_distribution(x, nbins)
    c0 = float(np.interp(float(x.min()), centres, cdf))  # what equalize_hist maps the minimum to
    if not c0 < 1.0:
        return out
    flat, dst = x.reshape(-1), out.reshape(-1)
    for k in range(0, flat.size, CHUNK_VOXELS):
        eq = np.interp(flat[k:k + CHUNK_VOXELS], centres, cdf)
        eq -= c0
        eq /= 1.0 - c0
        dst[k:k + CHUNK_VOXELS] = eq
    return out


def clahe_slices(image: np.ndarray, clip_limit: float, kernel_size: int | tuple[int, int] | None = None,
                 nbins: int = HIST_BINS) -> np.ndarray:
    """skimage.exposure.equalize_adapthist on every axial slice; float32 in [0, 1].

    Input outside [0, 1] is scaled to [0, 1] over the volume first; constant slices give 0."""
    x = _f32(image)
    if x.ndim != 3:
        raise ValueError(f"expected a 3D (Z, Y, X) array, got shape {x.shape}")
    out = np.zeros(x.shape, dtype=np.float32)
    if x.size == 0:
        return out
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        if not hi > lo:
            return out
        x = (x - np.float32(lo)) / np.float32(hi - lo)
    ks = None if kernel_size is None else (tuple(int(k) for k in kernel_size) if np.ndim(kernel_size) else int(kernel_size))
    for z in range(x.shape[0]):
        s = x[z]
        if s.max() > s.min():
            out[z] = exposure.equalize_adapthist(s, kernel_size=ks, clip_limit=float(clip_limit), nbins=nbins)
    return out


def options_for(plans: Plans, data_identifier: str) -> dict[str, Any]:
    """The voxel-changing options of a data identifier ({} for a planned one), ``base`` included."""
    return dict(plans.data_preprocessing.get(data_identifier) or {})


def options_hash(options: Mapping[str, Any]) -> str:
    """Content hash of the options (``NO_OPTIONS_HASH`` for none), recorded with the data."""
    return hash_json(dict(options))


def needs_body_mask(options: Mapping[str, Any]) -> bool:
    return options.get("intensity", "ct") == "zscore_image"


def apply_options(image_hu_in_target_grid: np.ndarray, options: Mapping[str, Any], plans_normalisation: Normalisation,
                  body_mask: np.ndarray | None = None) -> np.ndarray:
    """Smoothing -> intensity mapping -> histogram equalisation -> CLAHE (module doc); float32.

    With no options this is ``normalise_ct(image, plans_normalisation)``, bit for bit. Keys
    not about voxel values (``inplane_factor``: in the target spacing already; ``base``) are
    ignored. The input is not modified."""
    x = np.asarray(image_hu_in_target_grid)
    sigma = float(options.get("gaussian_sigma_voxels", 0.0) or 0.0)
    if sigma > 0:
        x = smooth(x, sigma)
    mode = options.get("intensity", "ct")
    if mode == "ct":
        x = normalise_ct(x, plans_normalisation)
    elif mode == "window":
        lo, hi = options["window_hu"]
        x = window(x, lo, hi)
    elif mode == "zscore_image":
        x = zscore(x, body_mask)
    else:
        raise ValueError(f"unknown intensity mode {mode!r} (known: ct, window, zscore_image)")
    if options.get("histogram_equalisation"):
        x = equalise_histogram(x)
    clahe = options.get("clahe")
    if clahe:
        x = clahe_slices(x, float(clahe.get("clip_limit", 0.01)), clahe.get("kernel_size"))
    return x
