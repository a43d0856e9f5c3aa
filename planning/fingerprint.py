"""Dataset fingerprint: a per-case analysis (map) and a dataset-level reduce.

Pure functions over arrays and dicts: no file I/O except ``load_fingerprint``, no torch.
Array layout (Z, Y, X), spacing in mm in the same order, intensities in HU.

Tumour components use 26-connectivity (voxels touching by a face, an edge or a corner belong
to the same lesion), so a lesion whose boundary voxels meet only diagonally is not split in
two; it is the stricter choice for counting lesions (6-connectivity would report more,
smaller components for the same mask).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from planning.crop import bbox_of, body_bbox, box_shape, crop
from planning.errors import AutoliverError
from planning.jsonio import read_json_file

FINGERPRINT_SCHEMA_VERSION = 1
PERCENTILES = (5, 10, 50, 90, 95)
VOLUME_PERCENTILES = (5, 10, 25, 50, 75, 90, 95)
TUMOUR_LABEL = 2
CONNECTIVITY = 26
COUNT_CHUNK = 1 << 24  # voxels per bincount chunk: bounds the int64 copy to 128 MiB
REBUILD = "re-run `autoliver plan_and_preprocess` to rebuild it"


class FingerprintFormatError(AutoliverError, ValueError):
    """fingerprint.json is missing or malformed; the message names the file and the fix."""


def _sample(values: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``n`` values drawn without replacement (all of them when fewer exist)."""
    if values.size <= n:
        return values.astype(np.float32, copy=True)
    idx = rng.choice(values.size, size=n, replace=False)
    idx.sort()
    return values[idx].astype(np.float32, copy=False)


def tumour_components(mask: np.ndarray, spacing: tuple[float, float, float]) -> list[float]:
    """Volumes (mm³) of the 26-connected components of a boolean mask, largest first."""
    box = bbox_of(mask)
    if box is None:
        return []
    structure = np.ones((3, 3, 3), dtype=bool)
    labelled, n = ndimage.label(crop(mask, box), structure=structure)
    if n == 0:
        return []
    counts = np.bincount(labelled.ravel(), minlength=n + 1)[1:]
    voxel_mm3 = float(np.prod(spacing))
    return [float(c) * voxel_mm3 for c in sorted(counts.tolist(), reverse=True)]


def class_voxel_counts(label: np.ndarray) -> dict[str, int]:
    """Voxels per label value present (keys are the values as strings), counted in chunks."""
    if not np.issubdtype(label.dtype, np.integer):
        if not np.all(np.mod(label, 1) == 0):
            raise ValueError(f"label map must hold integer values, got dtype {label.dtype} with fractional values")
    flat = label.ravel()
    counts = np.zeros(1, dtype=np.int64)
    for start in range(0, flat.size, COUNT_CHUNK):
        chunk = flat[start : start + COUNT_CHUNK].astype(np.int64)
        if chunk.size and chunk.min() < 0:
            raise ValueError(f"label map holds negative value {int(chunk.min())}; labels must be >= 0")
        part = np.bincount(chunk)
        if part.size > counts.size:
            part[: counts.size] += counts
            counts = part
        else:
            counts[: part.size] += part
    return {str(v): int(c) for v, c in enumerate(counts) if c > 0}


def analyse_case(
    image: np.ndarray,
    label: np.ndarray,
    spacing: tuple,
    direction: tuple,
    rng: np.random.Generator,
    samples_per_class: int = 10000,
    tumour_label: int = TUMOUR_LABEL,
) -> dict:
    """Measure one case: geometry, class voxel counts, intensity samples, tumour components.

    ``image`` (Z, Y, X) in HU and ``label`` (Z, Y, X) integer map on the same grid.
    Intensity samples: for the whole foreground (label > 0, key ``"foreground"``) and for each
    foreground class (key ``str(value)``), ``samples_per_class`` voxels drawn without
    replacement with ``rng`` (every voxel when the class has fewer), as float32 arrays. They
    feed the dataset-level intensity statistics and are not written to JSON.
    """
    if image.ndim != 3 or label.shape != image.shape:
        raise ValueError(f"image {image.shape} and label {label.shape} must be 3D arrays of the same shape")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive numbers (z, y, x) mm, got {spacing}")
    if samples_per_class < 1:
        raise ValueError(f"samples_per_class must be >= 1, got {samples_per_class}")
    spacing = tuple(float(s) for s in spacing)
    box = body_bbox(image, label)
    flat_label = label.ravel()
    flat_image = image.ravel()
    class_voxels = class_voxel_counts(label)
    samples = {"foreground": _sample(flat_image[flat_label > 0], samples_per_class, rng)}
    for value in sorted(int(k) for k in class_voxels):
        if value > 0:
            samples[str(value)] = _sample(flat_image[flat_label == value], samples_per_class, rng)
    volumes = tumour_components(label == tumour_label, spacing)
    return {
        "spacing": list(spacing),
        "shape": [int(s) for s in image.shape],
        "crop_box": [[int(a), int(b)] for a, b in box],
        "shape_after_crop": [int(s) for s in box_shape(box)],
        "direction": [float(d) for d in direction],
        "class_voxels": class_voxels,
        "tumour_component_volumes_mm3": volumes,
        "samples": samples,
    }


def intensity_stats(samples: np.ndarray) -> dict:
    """mean, std, median, min, max and the 0.5 / 99.5 percentiles of a 1D sample (None if empty)."""
    keys = ("mean", "std", "median", "min", "max", "percentile_00_5", "percentile_99_5")
    if samples.size == 0:
        return {k: None for k in keys} | {"n_samples": 0}
    x = samples.astype(np.float64, copy=False)
    return {
        "mean": float(x.mean()),
        "std": float(x.std()),
        "median": float(np.median(x)),
        "min": float(x.min()),
        "max": float(x.max()),
        "percentile_00_5": float(np.percentile(x, 0.5)),
        "percentile_99_5": float(np.percentile(x, 99.5)),
        "n_samples": int(x.size),
    }


def _distribution(rows: np.ndarray) -> dict:
    """Median and percentiles (5, 10, 50, 90, 95) per axis of an (n_cases, 3) array."""
    return {
        "median": np.median(rows, axis=0).tolist(),
        "percentiles": {str(p): np.percentile(rows, p, axis=0).tolist() for p in PERCENTILES},
    }


def _tumour_stats(cases: dict[str, dict]) -> dict:
    per_case = np.array([len(c["tumour_component_volumes_mm3"]) for c in cases.values()], dtype=np.int64)
    volumes = np.array([v for c in cases.values() for v in c["tumour_component_volumes_mm3"]], dtype=np.float64)
    out = {
        "label": TUMOUR_LABEL,
        "connectivity": CONNECTIVITY,
        "cases_with_tumour": int((per_case > 0).sum()),
        "fraction_cases_with_tumour": float((per_case > 0).mean()) if per_case.size else 0.0,
        "components_per_case": {
            "mean": float(per_case.mean()) if per_case.size else 0.0,
            "median": float(np.median(per_case)) if per_case.size else 0.0,
            "max": int(per_case.max()) if per_case.size else 0,
        },
    }
    vol: dict[str, float] = {"count": int(volumes.size)}
    if volumes.size:
        vol["min"] = float(volumes.min())
        vol.update({f"p{p}": float(np.percentile(volumes, p)) for p in VOLUME_PERCENTILES})
        vol["max"] = float(volumes.max())
        vol["total"] = float(volumes.sum())
    out["volume_mm3"] = vol
    return out


def reduce_fingerprint(cases: dict[str, dict], dataset_json: dict, dataset_name: str, input_hash: str) -> dict:
    """Combine ``analyse_case`` results into the dataset fingerprint (a JSON-able dict).

    Intensity statistics are computed over the concatenated per-case samples (every case
    weighs equally for classes that are larger than the per-case sample budget). Class voxel
    fractions are over all voxels of all cases (before cropping). Per-case entries keep only
    scalars and short lists (no samples).
    """
    if not cases:
        raise ValueError("reduce_fingerprint needs at least one case")
    ids = sorted(cases)
    spacings = np.array([cases[i]["spacing"] for i in ids], dtype=np.float64)
    shapes = np.array([cases[i]["shape"] for i in ids], dtype=np.float64)
    cropped = np.array([cases[i]["shape_after_crop"] for i in ids], dtype=np.float64)

    fg = np.concatenate([cases[i]["samples"]["foreground"] for i in ids])
    class_values = sorted({int(k) for i in ids for k in cases[i]["class_voxels"]})
    per_class = {}
    for value in class_values:
        if value == 0:
            continue
        parts = [cases[i]["samples"].get(str(value), np.empty(0, np.float32)) for i in ids]
        per_class[str(value)] = intensity_stats(np.concatenate(parts))

    totals = {str(v): int(sum(cases[i]["class_voxels"].get(str(v), 0) for i in ids)) for v in class_values}
    n_total = float(np.prod(shapes, axis=1).sum())

    per_case = {}
    for i in ids:
        c = cases[i]
        fg_i = c["samples"]["foreground"]
        per_case[i] = {
            "spacing": c["spacing"],
            "shape": c["shape"],
            "shape_after_crop": c["shape_after_crop"],
            "crop_box": c["crop_box"],
            "direction": c["direction"],
            "class_voxels": c["class_voxels"],
            "tumour_component_volumes_mm3": c["tumour_component_volumes_mm3"],
            "foreground_mean": float(fg_i.mean()) if fg_i.size else None,
            "foreground_std": float(fg_i.std()) if fg_i.size else None,
        }

    return {
        "schema_version": FINGERPRINT_SCHEMA_VERSION,
        "dataset_name": dataset_name,
        "input_hash": input_hash,
        "n_cases": len(ids),
        "labels": dict(dataset_json.get("labels", {})),
        "channel_names": dict(dataset_json.get("channel_names", dataset_json.get("modality", {}))),
        "spacing": _distribution(spacings),
        "shape": _distribution(shapes),
        "shape_after_crop": _distribution(cropped),
        "intensity": {"foreground": intensity_stats(fg), "per_class": per_class},
        "class_voxels": totals,
        "class_fractions": {k: v / n_total for k, v in totals.items()},
        "tumour": _tumour_stats(cases),
        "cases": per_case,
    }


def _numbers(value: object, n: int, positive: bool = True) -> bool:
    """``value`` is a list of ``n`` finite numbers (positive, and at most 1e6, when ``positive``)."""
    if not isinstance(value, list) or len(value) != n:
        return False
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    return ok and (not positive or all(0 < v <= 1e6 for v in value))


def fingerprint_problems(d: dict) -> list[str]:
    """What the planner would misuse in a parsed fingerprint (only the fields it reads)."""
    out = []
    n = d.get("n_cases")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        out.append(f"n_cases {n!r:.40} must be a positive integer")
    spacing, shape = d.get("spacing"), d.get("shape_after_crop")
    if not isinstance(spacing, dict) or not _numbers(spacing.get("median"), 3):
        out.append("spacing.median must be three positive voxel sizes (mm)")
    elif not isinstance(spacing.get("percentiles", {}), dict) or not _numbers(spacing.get("percentiles", {}).get("10", spacing["median"]), 3):
        out.append('spacing.percentiles["10"] must be three positive voxel sizes (mm)')
    if not isinstance(shape, dict) or not _numbers(shape.get("median"), 3):
        out.append("shape_after_crop.median must be three positive sizes (voxels, at most 1e6)")
    intensity = d.get("intensity")
    fg = intensity.get("foreground") if isinstance(intensity, dict) else None
    if not isinstance(fg, dict):
        out.append("intensity.foreground must be an object")
    elif fg.get("mean") is not None:
        values = [fg.get(k) for k in ("percentile_00_5", "percentile_99_5", "mean", "std")]
        if not _numbers(values, 4, positive=False):
            out.append(f"intensity.foreground percentile_00_5, percentile_99_5, mean and std must be finite numbers, got {values!r:.80}")
    if not isinstance(d.get("labels"), dict):
        out.append("labels must be an object")
    cases = d.get("cases") or {}
    if not isinstance(cases, dict) or not all(isinstance(c, dict) and _numbers(c.get("shape_after_crop"), 3) and _numbers(c.get("spacing"), 3)
                                              for c in cases.values()):
        out.append("cases must map case ids to objects with three positive shape_after_crop and spacing values")
    return out


def load_fingerprint(path: str | Path) -> dict:
    """Read fingerprint.json and check its schema version, required keys and the values the
    planner uses; FingerprintFormatError naming the file otherwise."""
    path = Path(path)
    d = read_json_file(path, FingerprintFormatError, REBUILD, "run `autoliver plan_and_preprocess` to create it")
    if not isinstance(d, dict):
        raise FingerprintFormatError(f"{path}: not a JSON object; {REBUILD}")
    if d.get("schema_version") != FINGERPRINT_SCHEMA_VERSION:
        raise FingerprintFormatError(
            f"{path}: schema_version {d.get('schema_version')!r:.60}, expected {FINGERPRINT_SCHEMA_VERSION}; {REBUILD}"
        )
    missing = [k for k in ("input_hash", "n_cases", "spacing", "shape_after_crop", "intensity", "labels") if k not in d]
    if missing:
        raise FingerprintFormatError(f"{path}: missing keys {missing}; {REBUILD}")
    problems = fingerprint_problems(d)
    if problems:
        raise FingerprintFormatError(f"{path}: {'; '.join(problems)}; {REBUILD}")
    return d
