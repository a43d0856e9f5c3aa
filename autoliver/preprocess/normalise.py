"""CT intensity normalisation: clip to [clip_low, clip_high] HU, then (x - mean) / std.

Input any real or integer (Z, Y, X) array in HU; output float32 (the computation dtype; the
preprocessed arrays are stored as float16 afterwards, see ``case.py``). Pure function: the
input is never modified.
"""

from __future__ import annotations

import math

import numpy as np

from planning.plans import Normalisation


def normalise_ct(image: np.ndarray, norm: Normalisation) -> np.ndarray:
    """Clip ``image`` (HU) to ``[norm.clip_low, norm.clip_high]`` and standardise; float32."""
    if not norm.std > 0:
        raise ValueError(f"normalisation std must be > 0, got {norm.std}")
    if not norm.clip_low <= norm.clip_high:
        raise ValueError(f"normalisation clip_low {norm.clip_low} > clip_high {norm.clip_high}")
    out = np.asarray(image, dtype=np.float32).copy() if image.dtype == np.float32 else image.astype(np.float32)
    np.clip(out, np.float32(norm.clip_low), np.float32(norm.clip_high), out=out)
    out -= np.float32(norm.mean)
    out /= np.float32(norm.std)
    return out


def air_pad_value(norm: Normalisation) -> float:
    """The normalised air level (clip_low after normalisation), as float16 storage holds it:
    what patches and sliding windows beyond the volume are padded with, so padding looks like
    the air around the body rather than like liver (0 = the foreground mean)."""
    value = (float(norm.clip_low) - float(norm.mean)) / float(norm.std) if norm.std else 0.0
    return float(np.float16(value)) if math.isfinite(value) else 0.0
