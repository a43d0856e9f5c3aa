"""ROI-first inference: a cheap pass finds the liver, the accurate pass runs only around it.

The coarse pass (``coarse_labels``) uses one fold of the ensemble's first model without
test-time augmentation: a 3d network on non-overlapping tiles (step 1) of the volume
average-pooled by ``coarse_factors`` (about ``COARSE_MM`` voxels, at most ``COARSE_MAX_FACTOR``
times the network's own spacing: it was trained at that scale), a 2d/2.5d network on every
k-th slice (k slices about ``COARSE_SLICE_MM`` apart). A cascade's lowres stage is the coarse
pass itself (its prediction is needed anyway). ``liver_box`` takes the largest connected liver
region (labels 1 + 2; components found on blocks of about ``BLOCK_MM``, so stray voxels are
ignored and nearby parts join), its bounding box plus ``margin_mm`` on every side, clipped to
the volume and grown to at least the network's patch where the volume allows. When the coarse
pass finds no liver, the whole volume is predicted.

Whether the coarse pass pays is decided before it runs (``roi_costs``): it costs its tiles'
voxels, the accurate pass over the whole volume its tiles' voxels times folds and mirrored
copies; the ROI is used when the coarse pass costs at most ``ROI_PAYOFF`` (half) of that:
besides the time it saves, it confines the prediction to the liver's region, so far-away
false positives never appear.
``grow_box`` is the safety net behind a coarse pass that cut the liver: a box side inside the
volume that the accurate pass's liver touches is moved out and the box predicted again.

Array layout (Z, Y, X) in the preprocessed grid; spacing in mm.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from autoliver.core.labels import STRUCTURES
from autoliver.infer.predictor import Box, Model, fold_predictor, inference_tiling, mirror_combos, tta_axes
from autoliver.infer.sliding_window import Window, argmax_labels, predict_slicewise, sliding_window_predict, tile_starts

log = logging.getLogger(__name__)

LIVER_LABELS = STRUCTURES["liver"]
MARGIN_MM = 20.0
COARSE_SLICE_MM = 10.0
COARSE_MM = 6.0
COARSE_MAX_FACTOR = 2
BLOCK_MM = 4.0
ROI_PAYOFF = 0.5


@dataclass(frozen=True)
class Roi:
    box: Box  # where the accurate pass runs (the whole volume when nothing was found)
    found: bool  # False: no liver in the coarse pass
    fraction: float  # box voxels / volume voxels
    seconds: float = 0.0  # coarse pass time


def full_box(shape: Sequence[int]) -> Box:
    return tuple((0, int(n)) for n in shape)


def box_fraction(box: Box, shape: Sequence[int]) -> float:
    return float(np.prod([b - a for a, b in box]) / np.prod(shape))


def coarse_factors(spacing: Sequence[float]) -> tuple[int, ...]:
    """Per-axis pooling of a 3d network's coarse pass: about ``COARSE_MM``, at most ``COARSE_MAX_FACTOR``."""
    return tuple(min(COARSE_MAX_FACTOR, max(1, int(COARSE_MM / float(s) + 1e-6))) for s in spacing)


def _coarse_slices(n_z: int, spacing_z: float) -> list[int]:
    k = max(1, int(round(COARSE_SLICE_MM / spacing_z)))
    return list(range(min(k // 2, n_z - 1), n_z, k))


def coarse_labels(model: Model, data: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Labels of a quick pass: (labels uint8 (n, Y', X'), z indices (n,) in ``data``, in-plane
    factors (fy, fx): row y' covers y = fy * y' ...) — every slice of the pooled volume for a
    3d network (non-overlapping tiles), every k-th slice for a 2d/2.5d one."""
    config = model.configuration
    predictor = fold_predictor(model, model.folds[0])
    spacing = config.spacing
    with torch.inference_mode():
        if config.network_dims == 2:
            zs = _coarse_slices(data.shape[0], spacing[0])
            volume = torch.from_numpy(np.asarray(data, dtype=np.float32))[None]
            window = Window(config.patch_size, step=1.0, n_classes=model.n_classes, device=model.device, pad_value=model.pad_value)
            logits = predict_slicewise(predictor, volume, window, in_slices=config.in_slices, slices=zs)
            return argmax_labels(logits), np.asarray(zs), (1, 1)
        factors = coarse_factors(spacing)
        image = torch.from_numpy(np.asarray(data, dtype=np.float32))[None, None]
        if any(f > 1 for f in factors):
            image = F.avg_pool3d(image, kernel_size=factors, stride=factors, ceil_mode=True)
        tile, starts = pass_tiling(model, image.shape[2:], 1.0)
        window = Window(tile, step=1.0, n_classes=model.n_classes, device=model.device, gaussian=False, pad_value=model.pad_value,
                        starts=starts)
        labels = argmax_labels(sliding_window_predict(predictor, image[0], window))
        return labels, np.arange(labels.shape[0]) * factors[0], (factors[1], factors[2])


def _tiles(shape: Sequence[int], patch: Sequence[int], step: float) -> int:
    return int(np.prod([len(tile_starts(int(s), int(p), step)) for s, p in zip(shape, patch)]))


def pass_tiling(model: Model, shape: Sequence[int], step: float) -> tuple[tuple[int, ...], list[list[int]]]:
    """(tile, starts) of one 3d pass over ``shape``: the model's inference tiling, else the
    patch window (starts over the volume padded up to the patch)."""
    tiling = inference_tiling(model, shape, step)
    if tiling is not None:
        return tiling
    patch = tuple(int(p) for p in model.configuration.patch_size)
    return patch, [tile_starts(max(int(s), p), p, step) for s, p in zip(shape, patch)]


def _pass_voxels(model: Model, shape: Sequence[int], step: float) -> float:
    """Network voxels of one 3d pass over ``shape`` (``pass_tiling``)."""
    tile, starts = pass_tiling(model, shape, step)
    return float(np.prod(tile) * np.prod([len(st) for st in starts]))


def roi_costs(model: Model, shape: Sequence[int], tta: bool, step: float) -> tuple[float, float]:
    """(coarse pass, accurate pass over the whole volume) in network voxels, for ``model`` on a
    preprocessed volume of ``shape``: counted from the tiles it would run (its inference
    tiling), before anything runs."""
    config = model.configuration
    patch = tuple(int(p) for p in config.patch_size)
    voxels = float(np.prod(patch))
    copies = len(model.folds) * (len(mirror_combos(tta_axes(config))) if tta else 1)  # mirrored copies with TTA
    if config.network_dims == 2:
        plane = shape[1:]
        coarse = len(_coarse_slices(int(shape[0]), config.spacing[0])) * _tiles(plane, patch, 1.0)
        accurate = int(shape[0]) * _tiles(plane, patch, step)
        return coarse * voxels, accurate * voxels * copies
    factors = coarse_factors(config.spacing)
    coarse_3d = _pass_voxels(model, [math.ceil(int(s) / f) for s, f in zip(shape, factors)], 1.0)
    return coarse_3d, _pass_voxels(model, shape, step) * copies


def _block_counts(mask: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Voxel counts of ``mask`` in blocks of ``factors`` (the array padded up to whole blocks)."""
    pads = [(0, (-n) % f) for n, f in zip(mask.shape, factors)]
    m = np.pad(mask, pads) if any(p for _, p in pads) else mask
    shape = [n // f for n, f in zip(m.shape, factors)]
    return m.reshape(shape[0], factors[0], shape[1], factors[1], shape[2], factors[2]).sum(axis=(1, 3, 5), dtype=np.int64)


def liver_box(labels: np.ndarray, z_index: np.ndarray, shape: Sequence[int], spacing: Sequence[float],
              margin_mm: float = MARGIN_MM, min_size: Sequence[int] = (), block_mm: float = BLOCK_MM,
              inplane: Sequence[int] = (1, 1)) -> Box | None:
    """Bounding box (in a volume of ``shape``) of the largest liver region of ``labels`` (rows
    at the slices ``z_index``; in-plane every ``inplane`` voxels) plus ``margin_mm``; None when
    there is no liver."""
    mask = np.isin(labels, LIVER_LABELS)
    if not mask.any():
        return None
    z_step = float(np.median(np.diff(z_index))) if len(z_index) > 1 else 1.0
    fy, fx = (int(f) for f in inplane)
    row_spacing = (spacing[0] * z_step, spacing[1] * fy, spacing[2] * fx)
    factors = [max(1, int(round(block_mm / s))) for s in row_spacing]
    counts = _block_counts(mask, factors)
    comps, n = ndimage.label(counts > 0, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = ndimage.sum(counts, comps, index=np.arange(1, n + 1))
    largest = int(np.argmax(sizes)) + 1
    blocks = ndimage.find_objects((comps == largest).astype(np.int32))[0]
    # the exact extent of the liver voxels inside the largest region's blocks
    sub = tuple(slice(b.start * f, min(n_, b.stop * f)) for b, f, n_ in zip(blocks, factors, mask.shape))
    region = comps[blocks] == largest
    for axis, f in enumerate(factors):
        region = np.repeat(region, f, axis)
    region = region[tuple(slice(0, s.stop - s.start) for s in sub)]
    inside = np.argwhere(mask[sub] & region)
    lo = inside.min(0) + [s.start for s in sub]
    hi = inside.max(0) + [s.start for s in sub] + 1
    lo[0], hi[0] = z_index[lo[0]], z_index[hi[0] - 1] + 1
    lo[1], hi[1], lo[2], hi[2] = lo[1] * fy, hi[1] * fy, lo[2] * fx, hi[2] * fx
    box = []
    for axis, (a, b) in enumerate(zip(lo, hi)):
        n_axis = int(shape[axis])
        m = int(math.ceil(margin_mm / spacing[axis]))
        if axis == 0 and len(z_index) > 1:
            m += int(math.ceil(z_step)) - 1  # the slices between the sampled ones
        a, b = max(0, int(a) - m), min(n_axis, int(b) + m)
        need = min(n_axis, int(min_size[axis]) if axis < len(min_size) else 0)
        if b - a < need:  # grow to the patch, centred, inside the volume
            a = max(0, min((a + b) // 2 - need // 2, n_axis - need))
            b = a + need
        box.append((a, b))
    return tuple(box)


def roi_min_size(model: Model) -> tuple[int, ...]:
    """The smallest box the accurate pass should get: the patch (in-plane for 2d)."""
    patch = tuple(model.configuration.patch_size)
    return patch if len(patch) == 3 else (1, *patch)


def find_roi(model: Model, data: np.ndarray, margin_mm: float = MARGIN_MM, labels: np.ndarray | None = None) -> Roi:
    """The ROI of ``data`` (preprocessed, ``model``'s grid): from ``labels`` (e.g. a cascade's
    lowres prediction in this grid) when given, else from ``coarse_labels``."""
    if not margin_mm >= 0:
        raise ValueError(f"the ROI margin must be >= 0 mm, got {margin_mm}")
    t0 = time.perf_counter()
    if labels is not None:
        rows, z_index, inplane = labels, np.arange(labels.shape[0]), (1, 1)
    else:
        rows, z_index, inplane = coarse_labels(model, data)
    box = liver_box(rows, z_index, data.shape, model.configuration.spacing, margin_mm, roi_min_size(model), inplane=inplane)
    seconds = time.perf_counter() - t0
    if box is None:
        log.info("ROI: the coarse pass found no liver; predicting the whole volume")
        return Roi(full_box(data.shape), False, 1.0, seconds)
    fraction = box_fraction(box, data.shape)
    log.info("ROI %s: %.1f%% of the volume (coarse pass %.1f s)", box, 100 * fraction, seconds)
    return Roi(box, True, fraction, seconds)


def grow_box(box: Box, labels: np.ndarray, shape: Sequence[int], spacing: Sequence[float], margin_mm: float = MARGIN_MM,
             block_mm: float = BLOCK_MM) -> Box:
    """``box`` with every side that lies inside the volume and that the largest liver region of
    ``labels`` (the accurate pass's labels over ``box``; regions found on blocks of about
    ``block_mm``, as in ``liver_box``) reaches moved out by twice ``margin_mm``: the same box
    when it reaches none. Smaller regions (false positives elsewhere) never grow the box."""
    liver = np.isin(labels, LIVER_LABELS)
    if not liver.any():
        return box
    factors = [max(1, int(round(block_mm / float(s)))) for s in spacing]
    counts = _block_counts(liver, factors)
    comps, n = ndimage.label(counts > 0, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = ndimage.sum(counts, comps, index=np.arange(1, n + 1))
    main = comps == int(np.argmax(sizes)) + 1
    out = []
    for axis, (a, b) in enumerate(box):
        step = int(math.ceil(2 * max(margin_mm, block_mm) / float(spacing[axis])))
        first, last = np.take(main, 0, axis=axis).any(), np.take(main, -1, axis=axis).any()
        a2 = max(0, a - step) if a > 0 and first else a
        b2 = min(int(shape[axis]), b + step) if b < int(shape[axis]) and last else b
        out.append((int(a2), int(b2)))
    return tuple(out)
