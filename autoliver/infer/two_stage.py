"""A two-stage design's inference: a liver stage finds the liver, a tumour stage looks for
tumour only in the liver's box (any network family; ``Configuration.stage`` "liver" / "tumour").

    liver-stage labels (Z, Y, X uint8) in the tumour stage's preprocessed grid
        (``liver_labels_in_grid`` resamples them there when the stages' grids differ)
    -> the liver's bounding box (labels 1 + 2, every component) plus ``margin_mm`` on every
       side (``ceil(margin / spacing)`` voxels, clipped to the volume; optionally grown to the
       network's patch, centred, where the volume allows: ``stage_min_size``)
    -> the tumour stage on that crop only, at its own resolution (``predict`` gets the
       crop, (C, z, y, x); ``window_predictor`` makes one from a tile predictor with the
       sliding window of ``autoliver.infer.volume.predict_volume``)
    -> combined labels: outside the liver stage's liver mask (labels 1 + 2) the liver stage's
       labels; inside it tumour (2) where the tumour stage's argmax is tumour, liver (1)
       elsewhere. Outside the mask there is never tumour.

Without liver (the liver stage found none) the liver stage's labels come back unchanged and
the tumour stage is not run. Both stages' grids come from the same crop of the image (every
data identifier of one plans.json), so a label map moves between them by its shape alone.

The tumour stage's probabilities over the box come back too (ensembling, CRF): they are the
tumour stage's own, not restricted to the liver mask.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from autoliver.core.geometry import check_spacing, margin_voxels
from autoliver.core.labels import LIVER, STRUCTURES, TUMOUR
from autoliver.data.sampler import liver_bbox
from autoliver.infer.sliding_window import argmax_labels
from autoliver.infer.volume import predict_volume
from autoliver.preprocess.resample import resample_labels
from planning.plans import Configuration

log = logging.getLogger(__name__)

Box = tuple[tuple[int, int], ...]  # half-open ((z0, z1), (y0, y1), (x0, x1)) in the tumour stage's grid
# the tumour stage on a crop: (C, z, y, x) float32 image -> (n_classes, z, y, x) probabilities
CropPredictor = Callable[[np.ndarray], "torch.Tensor | np.ndarray"]


@dataclass(frozen=True)
class TwoStageResult:
    labels: np.ndarray  # uint8 (Z, Y, X), the tumour stage's grid: the combined label map
    probabilities: torch.Tensor | None  # float32 (n_classes, *box shape): the tumour stage over the box; None without liver
    box: Box | None  # where the tumour stage ran (None: no liver, not run)

    @property
    def liver_found(self) -> bool:
        return self.box is not None


def liver_labels_in_grid(labels: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The liver stage's label map (Z, Y, X, its own preprocessed grid) in the tumour stage's
    grid of ``shape`` (label resampling without class leakage, small structures kept:
    ``autoliver.preprocess.resample.resample_labels``); a uint8 copy when the shapes agree."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"expected (Z, Y, X) liver-stage labels, got shape {labels.shape}")
    out = resample_labels(labels.astype(np.uint8, copy=False), tuple(int(s) for s in shape))
    return out.astype(np.uint8, copy=False)


def stage_min_size(config: Configuration) -> tuple[int, int, int]:
    """The smallest box worth giving ``config``'s network: its patch (in plane for 2d/2.5d),
    so that it sees real image around the liver as in training rather than padding."""
    p = [int(v) for v in config.patch_size]
    return (p[0], p[1], p[2]) if len(p) == 3 else (1, p[0], p[1])


def stage_context(config: Configuration) -> tuple[int, int, int]:
    """Voxels of image the network needs beyond the box: the neighbouring slices of 2.5d."""
    return (int(config.in_slices) // 2 if config.network_dims == 2 else 0, 0, 0)


def liver_roi_box(labels: np.ndarray, spacing: Sequence[float], margin_mm: float, min_size: Sequence[int] = ()) -> Box | None:
    """The bounding box of ``labels``' liver (labels 1 + 2) plus ``ceil(margin_mm / spacing)``
    voxels per side, clipped to the volume and grown (centred, inside the volume) to
    ``min_size`` where shorter; None when there is no liver."""
    if not (math.isfinite(float(margin_mm)) and float(margin_mm) >= 0):
        raise ValueError(f"the ROI margin must be a finite number >= 0 mm, got {margin_mm}")
    margins = margin_voxels(check_spacing(spacing), margin_mm)
    bbox = liver_bbox(labels, STRUCTURES["liver"])
    if bbox is None:
        return None
    box = []
    for axis, (a, b) in enumerate(bbox):
        n, m = int(labels.shape[axis]), margins[axis]
        a, b = max(0, a - m), min(n, b + m)
        need = min(n, int(min_size[axis]) if axis < len(min_size) else 0)
        if b - a < need:
            a = max(0, min((a + b) // 2 - need // 2, n - need))
            b = a + need
        box.append((int(a), int(b)))
    return tuple(box)


def _grow(box: Box, context: Sequence[int], shape: Sequence[int]) -> Box:
    return tuple((max(0, a - int(c)), min(int(n), b + int(c))) for (a, b), c, n in zip(box, context, shape))


def two_stage_predict(liver_labels: np.ndarray, data: np.ndarray, predict: CropPredictor, spacing: Sequence[float],
                      margin_mm: float, *, min_size: Sequence[int] = (), context: Sequence[int] = (0, 0, 0)) -> TwoStageResult:
    """Combine a liver stage and a tumour stage for one case (module docstring).

    ``liver_labels``: the liver stage's labels (Z, Y, X), ideally already in the tumour
    stage's grid (resampled here with ``liver_labels_in_grid`` when their shape differs from
    ``data``'s). ``data``: the tumour stage's preprocessed image, (Z, Y, X) or (C, Z, Y, X).
    ``predict``: the tumour stage on a crop, (C, z, y, x) -> (n_classes, z, y, x)
    probabilities (``window_predictor``). ``spacing``: the tumour stage's grid (z, y, x) mm.
    ``min_size``: grow the box to at least this (``stage_min_size``). ``context``: voxels per
    axis the crop reaches beyond the box (clipped to the volume; ``stage_context``); the
    output is cut back to the box, and nothing outside the box is ever written.
    """
    image = np.asarray(data)
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4:
        raise ValueError(f"expected a (Z, Y, X) or (C, Z, Y, X) image, got shape {np.shape(data)}")
    shape = tuple(int(s) for s in image.shape[1:])
    labels = np.asarray(liver_labels)
    if labels.ndim != 3:
        raise ValueError(f"expected (Z, Y, X) liver-stage labels, got shape {labels.shape}")
    if tuple(labels.shape) != shape:
        log.debug("two-stage: liver-stage labels %s resampled to the tumour stage's grid %s", labels.shape, shape)
        labels = liver_labels_in_grid(labels, shape)
    box = liver_roi_box(labels, spacing, margin_mm, min_size)
    if box is None:
        log.info("two-stage: the liver stage found no liver; the tumour stage is not run")
        return TwoStageResult(labels.astype(np.uint8, copy=True), None, None)
    region = _grow(box, context, shape)
    crop = np.ascontiguousarray(image[(slice(None), *(slice(a, b) for a, b in region))], dtype=np.float32)
    with torch.inference_mode():
        probs = predict(crop)
    probs = torch.as_tensor(probs).to("cpu", torch.float32)
    if probs.ndim != 4 or tuple(probs.shape[1:]) != crop.shape[1:] or probs.shape[0] <= TUMOUR:
        raise ValueError(f"the tumour stage returned shape {tuple(probs.shape)} for a crop of {crop.shape[1:]}; "
                         f"expected (n_classes >= 3, {', '.join(map(str, crop.shape[1:]))})")
    if region != box:
        inner = tuple(slice(a - r0, b - r0) for (a, b), (r0, _) in zip(box, region))
        probs = probs[(slice(None), *inner)].contiguous()
    inside = tuple(slice(a, b) for a, b in box)
    tumour = argmax_labels(probs) == TUMOUR
    out = labels.astype(np.uint8, copy=True)
    liver = np.isin(out, STRUCTURES["liver"])
    out[liver] = LIVER  # the liver stage's tumour is the tumour stage's call
    out_box, liver_box = out[inside], liver[inside]  # views
    out_box[liver_box & tumour] = TUMOUR
    log.info("two-stage: tumour stage on box %s (%.1f%% of the volume), %d tumour voxels",
             box, 100.0 * float(np.prod([b - a for a, b in box])) / float(np.prod(shape)), int((out_box == TUMOUR).sum()))
    return TwoStageResult(out, probs, box)


def window_predictor(tile_predictor: Callable[[torch.Tensor], torch.Tensor], config: Configuration, n_classes: int = 3,
                     device: torch.device | str | None = None, step: float = 0.5, pad_value: float = 0.0) -> CropPredictor:
    """The tumour stage as a ``CropPredictor``: ``tile_predictor`` ((B, C, *patch) -> logits,
    e.g. ``autoliver.infer.volume.make_predictor``) over the crop with ``config``'s sliding
    window (3d) or slice by slice (2d / 2.5d), as softmax probabilities. For a trained model
    with folds and mirroring use ``lambda crop: predict_preprocessed(model, crop[0], tta, step)``."""
    dev = None if device is None else torch.device(device)

    def predict(crop: np.ndarray) -> torch.Tensor:
        if crop.ndim != 4 or crop.shape[0] != 1:
            raise ValueError(f"window_predictor takes one image channel, (1, z, y, x); got shape {crop.shape}")
        return predict_volume(tile_predictor, crop[0], config, n_classes, dev, step, pad_value=pad_value)

    return predict


def fuse_probabilities(liver_probs: torch.Tensor, result: TwoStageResult) -> torch.Tensor:
    """Full-grid class probabilities of the two-stage design, from the liver stage's
    probabilities (C, Z, Y, X) in the tumour stage's grid and ``two_stage_predict``'s result:
    background keeps the liver stage's probability; the foreground probability (liver + tumour)
    is split between liver and tumour as the tumour stage splits it, inside the liver stage's
    liver and the box; elsewhere it is all liver (no tumour outside the liver). So ensembles
    and cross-validation average two-stage members like any other model."""
    p = liver_probs.clone()
    fg = p[LIVER] + p[TUMOUR]
    liver = torch.from_numpy(np.isin(result.labels, STRUCTURES["liver"]))
    share = torch.zeros_like(fg)
    if result.box is not None and result.probabilities is not None:
        inside = tuple(slice(a, b) for a, b in result.box)
        q = result.probabilities
        share[inside] = q[TUMOUR] / (q[LIVER] + q[TUMOUR]).clamp_min(1e-6)
    share = torch.where(liver, share, torch.zeros_like(share))
    p[TUMOUR] = fg * share
    p[LIVER] = fg - p[TUMOUR]
    return p
