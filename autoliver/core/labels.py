"""The label convention, in one place: 0 background, 1 liver, 2 tumour (LiTS / MSD Task03).

The liver *structure* is labels 1 + 2 (a tumour lies in the liver), the tumour structure is
label 2. Every module that needs a class index, a structure mask or a label-value check takes
it from here.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path

import numpy as np

BACKGROUND, LIVER, TUMOUR = 0, 1, 2
LABELS: Mapping[str, int] = {"background": BACKGROUND, "liver": LIVER, "tumour": TUMOUR}
LABEL_VALUES = (BACKGROUND, LIVER, TUMOUR)
N_CLASSES = len(LABEL_VALUES)
STRUCTURES: Mapping[str, tuple[int, ...]] = {"liver": (LIVER, TUMOUR), "tumour": (TUMOUR,)}
STRUCTURE_NAMES = tuple(STRUCTURES)


def liver_mask(seg: np.ndarray) -> np.ndarray:
    """Boolean mask of the liver structure (labels 1 and 2) of an integer label map."""
    return (seg >= LIVER) & (seg <= TUMOUR)


def tumour_mask(seg: np.ndarray) -> np.ndarray:
    """Boolean mask of the tumour structure (label 2)."""
    return seg == TUMOUR


def structure_mask(seg: np.ndarray, name: str) -> np.ndarray:
    """The mask of a structure by name (``liver`` or ``tumour``)."""
    if name == "liver":
        return liver_mask(seg)
    if name == "tumour":
        return tumour_mask(seg)
    raise ValueError(f"unknown structure {name!r}; known: {', '.join(STRUCTURE_NAMES)}")


def label_values(array: np.ndarray) -> np.ndarray:
    """The distinct values of an integer label map, fast for uint8 (a bincount)."""
    if array.dtype == np.uint8:
        return np.flatnonzero(np.bincount(array.reshape(-1), minlength=256))
    return np.unique(array)


def label_value_problems(path: str | Path, array: np.ndarray, allowed: Collection[int] | None = LABEL_VALUES,
                         allowed_from: str = "") -> list[str]:
    """Problems of a label map's values, naming ``path``: NaN/Inf, non-integer values, or values
    outside ``allowed`` (None: any integer). ``allowed_from`` says where the allowed set comes
    from (e.g. the dataset.json); by default the 0/1/2 convention."""
    if np.issubdtype(array.dtype, np.floating):
        n_bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if n_bad:
            return [f"{path}: label map holds {n_bad} NaN/Inf voxels; labels must be integers: re-export it as uint8"]
        values = np.unique(array)
        fractional = values[values != np.round(values)]
        if fractional.size:
            return [f"{path}: label map holds non-integer values (e.g. {fractional[:5].tolist()}); labels must be integers: "
                    "re-export it as uint8 (nearest-neighbour if it was resampled)"]
        values = values.astype(np.int64)
    elif np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        values = label_values(array).astype(np.int64)
    else:
        return [f"{path}: label map has dtype {array.dtype}; labels must be integers: re-export it as uint8"]
    if allowed is None:
        return []
    allowed = set(int(v) for v in allowed)
    extra = sorted(int(v) for v in values if int(v) not in allowed)
    if not extra:
        return []
    if allowed_from:
        return [f"{path}: label values {extra[:10]} are not declared in {allowed_from} {sorted(allowed)}; fix the label map or declare them"]
    return [f"{path}: label values {extra[:10]} found; only 0 (background), 1 (liver) and 2 (tumour) are allowed: fix the label map"]
