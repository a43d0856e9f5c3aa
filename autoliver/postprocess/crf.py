"""Fully connected 3D CRF on softmax probabilities (Krähenbühl & Koltun 2011), mean-field.

Energy E(x) = sum_i -log P_i(x_i) + sum_{i<j} [x_i != x_j] (w_s k_s(i, j) + w_b k_b(i, j)) with
Potts compatibility and two Gaussian kernels, widths in mm so they mean the same at any
spacing:

- spatial (smoothness) kernel exp(-|p_i - p_j|^2 / (2 spatial_sigma_mm^2));
- bilateral (appearance) kernel exp(-|p_i - p_j|^2 / (2 bilateral_sigma_mm^2)
  - (I_i - I_j)^2 / (2 bilateral_sigma_intensity^2)), where I is the CT as the preprocessed
  data holds it: HU clipped and z-scored with the dataset's foreground mean and std, so
  ``bilateral_sigma_intensity`` is in foreground-std units (one unit is the ``std`` of the
  plans' CT normalisation, about 40-60 HU on liver CT: 0.25 ~ 10-15 HU).

Both kernels are normalised (each voxel's message is a weighted *average* of its
neighbours' label probabilities, see ``bilateral.py``), so a weight is the largest logit
shift a kernel can cause and the weights do not depend on the voxel size. One mean-field
step: Q <- softmax(log P + w_s S(Q) + w_b B(Q)), with S, B the filtered Q. Only C - 1
channels are filtered; the last is 1 - the others' sum (exact for normalised filters).

The CRF runs inside the bounding box of the predicted liver (argmax labels >= 1, i.e. liver
and tumour) grown by ``margin_mm``; outside it, and when no liver is predicted, the input
is returned unchanged. Cost is O(voxels in the box) per iteration (separable Gaussian and
bilateral grid, no O(N^2) pairwise sum).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from autoliver.core.geometry import check_spacing, mask_box_mm
from autoliver.postprocess.bilateral import build_grid, gaussian_filter_mm, grid_filter

log = logging.getLogger(__name__)

PROBABILITY_FLOOR = 1e-6  # unary = -log(max(P, floor)): a 0 from float16 storage is not -inf

# Keyword sets for cross-validation (units in the module doc), from gentle to strong.
# Weights are logit shifts. Intensity widths of 0.25-0.5 std (~10-20 HU) sit below the
# liver/tumour contrast (~1 std), so tumours are not smoothed into the liver; bilateral
# widths of 5-20 mm and a 2-3 mm smoothness kernel follow the 3D CT CRF literature.
CRF_PARAM_GRID: list[dict] = [
    {"bilateral_sigma_mm": 5.0, "bilateral_sigma_intensity": 0.25, "bilateral_weight": 1.0, "spatial_sigma_mm": 2.0, "spatial_weight": 0.5},
    {"bilateral_sigma_mm": 5.0, "bilateral_sigma_intensity": 0.25, "bilateral_weight": 3.0, "spatial_sigma_mm": 2.0, "spatial_weight": 1.0},
    {"bilateral_sigma_mm": 10.0, "bilateral_sigma_intensity": 0.25, "bilateral_weight": 3.0, "spatial_sigma_mm": 2.0, "spatial_weight": 1.0},
    {"bilateral_sigma_mm": 10.0, "bilateral_sigma_intensity": 0.5, "bilateral_weight": 3.0, "spatial_sigma_mm": 3.0, "spatial_weight": 1.0},
    {"bilateral_sigma_mm": 20.0, "bilateral_sigma_intensity": 0.25, "bilateral_weight": 5.0, "spatial_sigma_mm": 3.0, "spatial_weight": 1.0},
]


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return value


def _non_negative(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a non-negative finite number, got {value}")
    return value


def liver_box(probabilities: np.ndarray, spacing, margin_mm: float) -> tuple[slice, slice, slice] | None:
    """Bounding box (slices) of argmax >= 1 over (C, Z, Y, X) ``probabilities``, grown by
    ``margin_mm`` and clipped to the volume; None when no voxel is foreground."""
    fg = probabilities[1:].max(axis=0) > probabilities[0]  # argmax >= 1 without an int64 map
    return mask_box_mm(fg, spacing, margin_mm)  # type: ignore[return-value]


def _softmax_(logits: np.ndarray) -> np.ndarray:
    """In-place softmax over axis 0 of a float32 (C, ...) array."""
    logits -= logits.max(axis=0, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=0, keepdims=True)
    return logits


def mean_field(probabilities: np.ndarray, image: np.ndarray, spacing, n_iterations: int,
               spatial_sigma_mm: float, spatial_weight: float, bilateral_sigma_mm: float,
               bilateral_sigma_intensity: float, bilateral_weight: float) -> np.ndarray:
    """Mean-field inference on the whole volume from normalised float32 (C, Z, Y, X)
    ``probabilities`` (validated arguments); float32 (C, Z, Y, X) marginals."""
    unary = np.log(np.maximum(probabilities, np.float32(PROBABILITY_FLOOR)))
    q = probabilities
    grid = None
    if bilateral_weight > 0 and n_iterations > 0:
        grid = build_grid(image, spacing, bilateral_sigma_mm, bilateral_sigma_intensity)
    for it in range(n_iterations):
        logits = unary.copy()
        head = q[:-1]
        if spatial_weight > 0:
            msg = gaussian_filter_mm(head, spacing, spatial_sigma_mm)
            logits[:-1] += np.float32(spatial_weight) * msg
            logits[-1] += np.float32(spatial_weight) * (1.0 - msg.sum(axis=0))
        if grid is not None:
            msg = grid_filter(grid, head)
            logits[:-1] += np.float32(bilateral_weight) * msg
            logits[-1] += np.float32(bilateral_weight) * (1.0 - msg.sum(axis=0))
        q = _softmax_(logits)
        log.debug("mean-field iteration %d/%d done", it + 1, n_iterations)
    return q


def dense_crf(
    probabilities: np.ndarray,
    image: np.ndarray,
    spacing,
    *,
    n_iterations: int = 5,
    spatial_sigma_mm: float = 2.0,
    spatial_weight: float = 1.0,
    bilateral_sigma_mm: float = 10.0,
    bilateral_sigma_intensity: float = 0.25,
    bilateral_weight: float = 3.0,
    roi: str | None = "liver",
    margin_mm: float = 10.0,
) -> np.ndarray:
    """Dense-CRF refinement of (C, Z, Y, X) softmax ``probabilities`` guided by the (Z, Y, X)
    normalised CT ``image`` at ``spacing`` (z, y, x) mm; returns float32 (C, Z, Y, X)
    probabilities (non-negative, summing to 1 per voxel). See the module doc for the model,
    the parameters' units and the region of interest; the defaults are CRF_PARAM_GRID[2].
    Raises ValueError for bad arguments."""
    probabilities = np.asarray(probabilities)
    image = np.asarray(image)
    if probabilities.ndim != 4 or probabilities.shape[0] < 2:
        raise ValueError(f"probabilities must be (C, Z, Y, X) with C >= 2, got shape {probabilities.shape}")
    if image.shape != probabilities.shape[1:]:
        raise ValueError(f"image shape {image.shape} does not match probabilities' spatial shape {probabilities.shape[1:]}")
    spacing = check_spacing(spacing)
    if int(n_iterations) != n_iterations or n_iterations < 0:
        raise ValueError(f"n_iterations must be a non-negative integer, got {n_iterations}")
    params = dict(
        n_iterations=int(n_iterations),
        spatial_sigma_mm=_positive("spatial_sigma_mm", spatial_sigma_mm),
        spatial_weight=_non_negative("spatial_weight", spatial_weight),
        bilateral_sigma_mm=_positive("bilateral_sigma_mm", bilateral_sigma_mm),
        bilateral_sigma_intensity=_positive("bilateral_sigma_intensity", bilateral_sigma_intensity),
        bilateral_weight=_non_negative("bilateral_weight", bilateral_weight),
    )
    margin_mm = _non_negative("margin_mm", margin_mm)
    if roi not in ("liver", None):
        raise ValueError(f"roi must be 'liver' or None, got {roi!r}")
    probs = probabilities.astype(np.float32, copy=True)
    if not np.isfinite(probs).all() or (probs < 0).any():
        raise ValueError("probabilities must be finite and non-negative")
    if not np.isfinite(image).all():
        raise ValueError("image contains NaN or infinite values")

    box = (slice(None),) * 3 if roi is None else liver_box(probs, spacing, margin_mm)
    if box is None:
        log.debug("dense_crf: no liver predicted, probabilities returned unchanged")
        return probs
    t0 = time.perf_counter()
    crop = probs[(slice(None),) + box]
    sums = crop.sum(axis=0)
    if not (sums > 0).all():
        raise ValueError("probabilities sum to 0 at some voxel")
    crop /= sums  # in place: the box of the output array
    out = mean_field(crop, image[box].astype(np.float32), spacing, **params)
    probs[(slice(None),) + box] = out
    log.debug("dense_crf: %d iterations on box %s in %.1f s", params["n_iterations"],
              crop.shape[1:], time.perf_counter() - t0)
    return probs
