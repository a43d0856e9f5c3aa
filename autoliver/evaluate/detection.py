"""Tumour (lesion) detection, following the LiTS evaluation.

Lesions are the connected components (6-connected, face neighbours) of the tumour masks. As in
the LiTS scoring code, reference lesions are labelled after an in-plane dilation by one voxel
(a 3 x 3 cross in each axial slice), then trimmed back to the reference mask: reference pieces
that touch diagonally or are at most two voxels apart within a slice count as one lesion
(annotation noise, not separate tumours); a gap of even one slice between pieces is never
bridged this way. Predicted lesions are labelled as they are.

Matching, with merging of split and joined lesions (LiTS procedure):

1. I[p, r] = voxels shared by predicted lesion p and reference lesion r.
2. Each reference lesion that any prediction touches is owned by the predicted lesion that
   overlaps it most (ties: the lowest label). The reference lesions owned by one prediction are
   merged into one reference group: a prediction joining several tumours is one match covering
   all of them.
3. Each predicted lesion touching a reference lesion is assigned to the reference group it
   overlaps most; the predictions assigned to one group are merged: a tumour split into pieces
   by the prediction is one match.
4. Each (merged predictions, merged references) pair is a match, with
   IoU = |P n R| / |P u R|, where |P n R| sums I over the pair.

A match is a detection at a threshold t when IoU > t (t = 0: any overlap; LiTS also reports
t = 0.5). Counts at t: TP = reference lesions inside detected matches (a merged group counts
each of its lesions); FN = reference lesions - TP; FP = predicted lesions touching no reference
lesion + matches that fail the threshold (each counted once). Precision = TP / (TP + FP),
recall = TP / (TP + FN), pooled over cases; undefined (NaN) with a zero denominator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

LESION_STRUCTURE = ndimage.generate_binary_structure(3, 1)
JOIN_STRUCTURE = np.zeros((1, 3, 3), dtype=bool)  # in-plane (Y, X) cross of radius 1
JOIN_STRUCTURE[0, 1, :] = JOIN_STRUCTURE[0, :, 1] = True
THRESHOLDS = {"overlap": 0.0, "iou50": 0.5}


@dataclass(frozen=True)
class LesionMatch:
    """Predicted lesions (labels) matched to reference lesions (labels), both merged."""

    pred_lesions: tuple[int, ...]
    ref_lesions: tuple[int, ...]
    intersection: int  # voxels
    union: int  # voxels

    @property
    def iou(self) -> float:
        return self.intersection / self.union if self.union else 0.0


@dataclass(frozen=True)
class DetectionResult:
    n_ref: int
    n_pred: int
    matches: tuple[LesionMatch, ...]

    def counts(self, threshold: float) -> tuple[int, int, int]:
        """(TP, FP, FN) with a match a detection when its IoU > ``threshold``."""
        detected = [m for m in self.matches if m.iou > threshold]
        tp = sum(len(m.ref_lesions) for m in detected)
        unmatched_pred = self.n_pred - sum(len(m.pred_lesions) for m in self.matches)
        fp = unmatched_pred + len(self.matches) - len(detected)
        return tp, fp, self.n_ref - tp

    @property
    def merged(self) -> int:
        """Matches whose prediction joins several reference lesions."""
        return sum(len(m.ref_lesions) > 1 for m in self.matches)

    @property
    def split(self) -> int:
        """Matches whose reference group is split into several predicted lesions."""
        return sum(len(m.pred_lesions) > 1 for m in self.matches)

    def to_json(self) -> dict:
        out: dict = {"n_ref": self.n_ref, "n_pred": self.n_pred}
        for name, t in THRESHOLDS.items():
            tp, fp, fn = self.counts(t)
            out.update({f"tp_{name}": tp, f"fp_{name}": fp, f"fn_{name}": fn})
        out.update({"merged": self.merged, "split": self.split})
        return out


def label_lesions(mask: np.ndarray, join_inplane: bool = False) -> tuple[np.ndarray, int]:
    """Connected components (int32 labels 1..n, 0 background) of a boolean (Z, Y, X) mask.

    ``join_inplane``: label after a one-voxel in-plane dilation, then trim it away (the LiTS
    treatment of reference lesions)."""
    mask = np.asarray(mask, dtype=bool)
    if not join_inplane:
        return ndimage.label(mask, structure=LESION_STRUCTURE, output=np.int32)
    grown = ndimage.binary_dilation(mask, structure=JOIN_STRUCTURE)
    labels, n = ndimage.label(grown, structure=LESION_STRUCTURE, output=np.int32)
    labels[~mask] = 0
    return labels, n


def intersection_matrix(pred_labels: np.ndarray, n_pred: int, ref_labels: np.ndarray, n_ref: int) -> np.ndarray:
    """I[p - 1, r - 1] = voxels with predicted label p and reference label r (int64)."""
    both = (pred_labels > 0) & (ref_labels > 0)
    pairs = (pred_labels[both].astype(np.int64) - 1) * n_ref + (ref_labels[both].astype(np.int64) - 1)
    return np.bincount(pairs, minlength=n_pred * n_ref).reshape(n_pred, n_ref)


def match_lesions(pred_labels: np.ndarray, n_pred: int, ref_labels: np.ndarray, n_ref: int) -> DetectionResult:
    """Match labelled lesions (see the module docstring)."""
    if pred_labels.shape != ref_labels.shape:
        raise ValueError(f"label maps differ in shape: prediction {pred_labels.shape}, reference {ref_labels.shape}")
    if n_pred == 0 or n_ref == 0:
        return DetectionResult(n_ref=n_ref, n_pred=n_pred, matches=())
    inter = intersection_matrix(pred_labels, n_pred, ref_labels, n_ref)
    pred_size = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)[1:]
    ref_size = np.bincount(ref_labels.ravel(), minlength=n_ref + 1)[1:]
    # 2. reference lesions grouped by the prediction that overlaps them most
    touched = np.flatnonzero(inter.sum(axis=0) > 0)
    owner = inter[:, touched].argmax(axis=0)
    groups: dict[int, list[int]] = {}
    for r, p in zip(touched.tolist(), owner.tolist()):
        groups.setdefault(p, []).append(r)
    group_list = [groups[p] for p in sorted(groups)]
    if not group_list:  # lesions on both sides, none touching: every one unmatched
        return DetectionResult(n_ref=n_ref, n_pred=n_pred, matches=())
    group_inter = np.stack([inter[:, g].sum(axis=1) for g in group_list], axis=1)  # (n_pred, n_groups)
    # 3. each touching prediction goes to the group it overlaps most
    assigned: dict[int, list[int]] = {}
    for p in np.flatnonzero(group_inter.sum(axis=1) > 0).tolist():
        assigned.setdefault(int(group_inter[p].argmax()), []).append(p)
    matches = []
    for g, preds in sorted(assigned.items()):
        refs = group_list[g]
        i = int(inter[np.ix_(preds, refs)].sum())
        union = int(pred_size[preds].sum() + ref_size[refs].sum()) - i
        matches.append(LesionMatch(pred_lesions=tuple(p + 1 for p in preds), ref_lesions=tuple(r + 1 for r in refs),
                                   intersection=i, union=union))
    return DetectionResult(n_ref=n_ref, n_pred=n_pred, matches=tuple(matches))


def detect_lesions(pred: np.ndarray, ref: np.ndarray, join_reference_inplane: bool = True) -> DetectionResult:
    """Lesion detection of two boolean tumour masks (Z, Y, X)."""
    if pred.shape != ref.shape:
        raise ValueError(f"masks differ in shape: prediction {pred.shape}, reference {ref.shape}")
    pred_labels, n_pred = label_lesions(pred)
    ref_labels, n_ref = label_lesions(ref, join_inplane=join_reference_inplane)
    return match_lesions(pred_labels, n_pred, ref_labels, n_ref)


def detection_summary(results: list[DetectionResult] | list[dict]) -> dict:
    """Pooled precision and recall over cases at each threshold ("overlap", "iou50").

    Takes DetectionResults or their ``to_json`` dicts."""
    rows = [r.to_json() if isinstance(r, DetectionResult) else r for r in results]
    out = {}
    for name in THRESHOLDS:
        tp = sum(r[f"tp_{name}"] for r in rows)
        fp = sum(r[f"fp_{name}"] for r in rows)
        fn = sum(r[f"fn_{name}"] for r in rows)
        out[name] = {
            "precision": tp / (tp + fp) if tp + fp else math.nan,
            "recall": tp / (tp + fn) if tp + fn else math.nan,
            "tp": tp, "fp": fp, "fn": fn,
        }
    return out
