"""Overlap metrics of two binary masks, computed from their voxel counts.

``OverlapCounts`` holds the confusion counts of one structure in one case: tp (in both), fp (in
the prediction only), fn (in the reference only), tn (in neither). Every metric here is a pure
function of those counts, so global (dataset-wide) metrics come from summed counts.

Conventions (the LiTS ones where LiTS has one):

- Dice = 2 tp / (2 tp + fp + fn); IoU (Jaccard) = tp / (tp + fp + fn); VOE = 1 - IoU.
  When both masks are empty, Dice = IoU = 1 and VOE = 0 (LiTS: nothing to find, nothing found).
- Precision = tp / (tp + fp), recall (sensitivity) = tp / (tp + fn), F1 = their harmonic mean,
  which equals Dice for voxels. A zero denominator gives 1 when both masks are empty and 0
  otherwise (an empty prediction has recall 0 and, by this rule, precision 0).
- RVD (relative volume difference) = (|pred| - |ref|) / |ref|, signed: positive means the
  prediction is too large. Undefined (NaN) when the reference is empty. CHAOS's RAVD is
  100 * |RVD| (in percent).
- Accuracy = (tp + tn) / all voxels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from autoliver.core.labels import STRUCTURE_NAMES, structure_mask


@dataclass(frozen=True)
class OverlapCounts:
    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def n_ref(self) -> int:
        return self.tp + self.fn

    @property
    def n_pred(self) -> int:
        return self.tp + self.fp

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    def __add__(self, other: "OverlapCounts") -> "OverlapCounts":
        return OverlapCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)


def overlap_counts(pred: np.ndarray, ref: np.ndarray, total: int | None = None) -> OverlapCounts:
    """Confusion counts of two boolean masks of the same shape.

    ``total`` is the voxel count of the whole volume when ``pred`` and ``ref`` are crops of it
    (everything outside the crop being background in both); default: their size.
    """
    if pred.shape != ref.shape:
        raise ValueError(f"masks differ in shape: prediction {pred.shape}, reference {ref.shape}")
    n_pred, n_ref = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    tp = int(np.count_nonzero(np.logical_and(pred, ref))) if n_pred and n_ref else 0
    size = int(pred.size) if total is None else int(total)
    if size < pred.size:
        raise ValueError(f"total {size} is smaller than the masks' size {pred.size}")
    return OverlapCounts(tp=tp, fp=n_pred - tp, fn=n_ref - tp, tn=size - n_pred - n_ref + tp)


def _ratio(num: int, den: int, both_empty: bool) -> float:
    if den == 0:
        return 1.0 if both_empty else 0.0
    return num / den


def _both_empty(c: OverlapCounts) -> bool:
    return c.tp + c.fp + c.fn == 0


def dice(c: OverlapCounts) -> float:
    return _ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn, _both_empty(c))


def iou(c: OverlapCounts) -> float:
    return _ratio(c.tp, c.tp + c.fp + c.fn, _both_empty(c))


def voe(c: OverlapCounts) -> float:
    return 1.0 - iou(c)


def rvd(c: OverlapCounts) -> float:
    """(|pred| - |ref|) / |ref|; NaN when the reference is empty."""
    if c.n_ref == 0:
        return math.nan
    return (c.n_pred - c.n_ref) / c.n_ref


def precision(c: OverlapCounts) -> float:
    return _ratio(c.tp, c.tp + c.fp, _both_empty(c))


def recall(c: OverlapCounts) -> float:
    return _ratio(c.tp, c.tp + c.fn, _both_empty(c))


def f1(c: OverlapCounts) -> float:
    p, r = precision(c), recall(c)
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def accuracy(c: OverlapCounts) -> float:
    return _ratio(c.tp + c.tn, c.total, True)


OVERLAP_METRICS = {
    "dice": dice,
    "iou": iou,
    "voe": voe,
    "rvd": rvd,
    "precision": precision,
    "recall": recall,
    "f1": f1,
    "accuracy": accuracy,
}


def overlap_metrics(c: OverlapCounts) -> dict[str, float]:
    """Every metric above, by name."""
    return {name: fn(c) for name, fn in OVERLAP_METRICS.items()}


def mask_dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (LiTS)."""
    p, r = np.count_nonzero(pred), np.count_nonzero(ref)
    if p + r == 0:
        return 1.0
    return 2.0 * np.count_nonzero(pred & ref) / (p + r)


def case_dice(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Liver (labels 1 + 2) and tumour (label 2) Dice of two label maps (LiTS empty rule)."""
    return {name: mask_dice(structure_mask(pred, name), structure_mask(ref, name)) for name in STRUCTURE_NAMES}
