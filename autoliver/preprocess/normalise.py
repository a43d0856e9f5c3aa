"""CT intensity normalisation: clip to [clip_low, clip_high] HU, then (x - mean) / std.

Input any real or integer (Z, Y, X) array in HU; output float32 (the computation dtype; the
preprocessed arrays are stored as float16 afterwards, see ``case.py``). Pure function: the
input is never modified.

The pad value (what patches and sliding windows beyond the volume are filled with) is air as
the data's preprocessing maps it: ``air_pad_value`` for the plan's CT normalisation,
``pad_value_for`` for any data identifier (options of derived data folders included, see
``intensity.py``).
"""

from __future__ import annotations

import math

import numpy as np

from planning.plans import Normalisation, Plans


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


AIR_HU = -1000.0  # what the padding stands for
DATA_DEPENDENT_PAD = ("zscore_image",)  # intensity modes whose air level differs per image
# a per-image z-score puts air at about -6.4 .. -7.8 (the minimum of the shipped real CTs,
# lits117 / chaos / totalseg, z-scored over the body); used only when no value is recorded
ZSCORE_PAD_FALLBACK = -7.0


def pad_is_recorded(plans: Plans, data_identifier: str) -> bool:
    """Whether ``data_identifier``'s pad value depends on the image (then each case records
    its own ``pad_value`` and the data folder the minimum over its cases)."""
    options = plans.data_preprocessing.get(data_identifier) or {}
    return (options.get("intensity", "ct") in DATA_DEPENDENT_PAD and not options.get("histogram_equalisation")
            and not options.get("clahe"))


def pad_value_for(plans: Plans, data_identifier: str, recorded: float | None = None) -> float:
    """What image patches and sliding windows beyond the volume of ``data_identifier``'s data
    are padded with: air as the identifier's preprocessing maps it, as float16 holds it.

    Planned identifier (no options) or ``intensity`` "ct": ``air_pad_value(plans.normalisation)``
    (smoothing leaves the clipped air level alone). Histogram equalisation or CLAHE: 0.0 (both
    put the minimum, air, at 0). "window": -1000 HU windowed (0.0 for a window above it).
    "zscore_image": the z-score of air differs per image; ``recorded`` is then used: a case's
    ``pad_value`` (the minimum of its data) or the data folder's (``dataset_properties.json``:
    the minimum over its cases); without one, ``ZSCORE_PAD_FALLBACK``.
    """
    options = plans.data_preprocessing.get(data_identifier) or {}
    mode = options.get("intensity", "ct")
    if not options or (mode == "ct" and not options.get("histogram_equalisation") and not options.get("clahe")):
        return air_pad_value(plans.normalisation)
    if options.get("histogram_equalisation") or options.get("clahe"):
        return 0.0
    if mode == "window":
        lo, hi = (float(v) for v in options["window_hu"])
        return float(np.float16((min(max(AIR_HU, lo), hi) - lo) / (hi - lo)))
    if mode in DATA_DEPENDENT_PAD:
        if recorded is not None and math.isfinite(float(recorded)):
            return float(np.float16(float(recorded)))
        return ZSCORE_PAD_FALLBACK
    raise ValueError(f"{data_identifier}: unknown intensity mode {mode!r}")
