"""Preprocess one case (crop to body, normalise, resample) and map predictions back.

Array layout (Z, Y, X); spacing in mm (z, y, x); intensities in HU before normalisation.
Cubic overshoot is clipped to the normalised intensity range (ringing at the clipped
air/tissue edge reached 1.4 std, about 55 HU, on lits117). The stored data are float16: normalised CT spans a few units, where float16's step is at most
0.004 (about 0.1-0.2 HU after un-normalising, far below CT noise), and it halves disk, page
cache and read time against float32 (numbers in benchmarks/storage_formats.py). A plan
whose normalisation would overflow float16 falls back to float32, with a warning.

``properties`` (JSON) hold what ``map_back`` needs to return to the original grid exactly:
the original geometry, the crop box and the shape after cropping; plus foreground sampling
locations in the preprocessed grid: up to ``N_LOCATIONS`` voxels per class, and a few voxels
of every tumour component so that small tumours are sampled by the data loader too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
from scipy import ndimage

from autoliver.io.images import Geometry
from autoliver.preprocess.normalise import normalise_ct
from autoliver.preprocess.resample import (
    is_anisotropic,
    new_shape_for,
    resample_labels,
    resample_probabilities,
    resample_to_shape,
)
from planning.crop import bbox_of, body_bbox, box_shape, crop
from planning.plans import Plans

log = logging.getLogger(__name__)

N_LOCATIONS = 10000  # sampled voxels per class
PER_COMPONENT = 10  # sampled voxels per tumour component
TUMOUR_LABEL = 2
SAMPLED_CLASSES = (1, 2)  # liver, tumour
DATA_DTYPE = np.float16
FLOAT16_SAFE = 60000.0


def crop_and_normalise(image: np.ndarray, label: np.ndarray | None, plans: Plans):
    """Crop image (and label) to the body box and normalise the image.

    Returns (normalised float32 image, cropped uint8 label or None, box).
    """
    if image.ndim != 3:
        raise ValueError(f"expected a 3D (Z, Y, X) image, got shape {image.shape}")
    if label is not None:
        if label.shape != image.shape:
            raise ValueError(f"label shape {label.shape} differs from image shape {image.shape}")
        if label.dtype != np.uint8:
            if label.size and (label.min() < 0 or label.max() > 255):
                raise ValueError(f"label values must lie in [0, 255], got [{label.min()}, {label.max()}]")
            label = label.astype(np.uint8)
    box = body_bbox(image, label)
    data = normalise_ct(crop(image, box), plans.normalisation)
    seg = None if label is None else np.ascontiguousarray(crop(label, box))
    return data, seg, box


def _data_dtype(data: np.ndarray):
    if data.size and float(np.abs(data).max()) > FLOAT16_SAFE:
        log.warning("normalised intensities exceed float16 range; storing float32 (check the plan's std)")
        return np.float32
    return DATA_DTYPE


def class_locations(seg: np.ndarray, rng: np.random.Generator, n: int = N_LOCATIONS,
                    classes: Sequence[int] = SAMPLED_CLASSES) -> dict[str, list[list[int]]]:
    """Up to ``n`` voxel coordinates (z, y, x) per class, drawn without replacement."""
    out: dict[str, list[list[int]]] = {}
    for c in classes:
        mask = seg == c
        box = bbox_of(mask)
        if box is None:
            out[str(c)] = []
            continue
        sub = crop(mask, box)
        flat = np.flatnonzero(sub)
        if flat.size > n:
            flat = np.sort(rng.choice(flat, size=n, replace=False))
        coords = np.stack(np.unravel_index(flat, sub.shape), axis=1) + np.array([lo for lo, _ in box])
        out[str(c)] = coords.astype(int).tolist()
    return out


def component_locations(seg: np.ndarray, rng: np.random.Generator, label: int = TUMOUR_LABEL,
                        per_component: int = PER_COMPONENT) -> dict:
    """Connected components (26-connected) of ``label``: count, sizes and a few voxels each."""
    mask = seg == label
    box = bbox_of(mask)
    if box is None:
        return {"label": label, "count": 0, "sizes": [], "locations": []}
    offset = np.array([lo for lo, _ in box])
    comps, count = ndimage.label(crop(mask, box), structure=np.ones((3, 3, 3), dtype=bool))
    sizes, locations = [], []
    for i, sl in enumerate(ndimage.find_objects(comps), start=1):
        local = np.argwhere(comps[sl] == i)
        sizes.append(int(len(local)))
        pick = local if len(local) <= per_component else local[np.sort(rng.choice(len(local), per_component, replace=False))]
        start = np.array([s.start for s in sl])
        locations.append((pick + start + offset).astype(int).tolist())
    return {"label": label, "count": int(count), "sizes": sizes, "locations": locations}


def resample_cropped(data: np.ndarray, seg: np.ndarray | None, spacing: Sequence[float],
                     target: Sequence[float]) -> tuple[np.ndarray, np.ndarray | None]:
    """Resample cropped normalised data (and label) from ``spacing`` to ``target``."""
    shape = new_shape_for(data.shape, spacing, target)
    order_z = 1 if is_anisotropic(spacing, target) else 3
    dtype = _data_dtype(data)
    if shape == tuple(data.shape):
        out = data.astype(dtype)
    else:
        out = resample_to_shape(data, shape, 3, order_z, dtype, clip_to_input_range=True)
    out_seg = None if seg is None else resample_labels(seg, shape)
    return out, out_seg


def iter_preprocessed(image: np.ndarray, geometry: Geometry, label: np.ndarray | None, plans: Plans,
                      data_identifiers: Sequence[str], seed: int = 0) -> Iterator[tuple[str, np.ndarray, np.ndarray | None, dict]]:
    """Crop and normalise once, then yield (identifier, data, seg, properties) per identifier."""
    if tuple(image.shape) != tuple(geometry.shape):
        raise ValueError(f"image shape {image.shape} differs from its geometry's {geometry.shape}")
    unknown = [d for d in data_identifiers if d not in plans.data_spacings]
    if unknown:
        raise ValueError(f"data identifiers {unknown} not in the plan (has {sorted(plans.data_spacings)})")
    cropped, cropped_seg, box = crop_and_normalise(image, label, plans)
    for ident in data_identifiers:
        target = tuple(float(s) for s in plans.data_spacings[ident])
        data, seg = resample_cropped(cropped, cropped_seg, geometry.spacing, target)
        props = {
            "geometry": geometry.to_json(),
            "crop_box": [list(b) for b in box],
            "shape_after_crop": list(box_shape(box)),
            "spacing_after_crop": list(geometry.spacing),
            "data_identifier": ident,
            "spacing": list(target),
            "shape_after_resampling": list(data.shape),
            "data_dtype": str(data.dtype),
            "seed": int(seed),
            "n_locations": N_LOCATIONS,
        }
        if seg is not None:
            rng = np.random.default_rng(seed)
            props["class_locations"] = class_locations(seg, rng)
            props["tumour_components"] = component_locations(seg, rng)
        yield ident, data, seg, props


def preprocess_case(image: np.ndarray, geometry: Geometry, label: np.ndarray | None, plans: Plans,
                    data_identifier: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Crop to body, normalise, resample to ``plans.data_spacings[data_identifier]``.

    Returns (data float16 (Z, Y, X), seg uint8 or None, JSON-able properties).
    """
    _, data, seg, props = next(iter_preprocessed(image, geometry, label, plans, [data_identifier], seed))
    return data, seg, props


def _original(properties: dict) -> tuple[Geometry, tuple, tuple[int, int, int]]:
    geometry = Geometry.from_json(properties["geometry"])
    box = tuple(tuple(int(v) for v in b) for b in properties["crop_box"])
    return geometry, box, tuple(int(v) for v in properties["shape_after_crop"])


def map_back(seg: np.ndarray, properties: dict) -> np.ndarray:
    """A (Z, Y, X) label map in the preprocessed grid -> the original grid (uint8).

    Label-safe resampling to the shape after cropping, then pasted at the crop box into a
    zero volume of the original shape; write it with ``Geometry.from_json(properties["geometry"])``.
    """
    geometry, box, cropped_shape = _original(properties)
    if seg.ndim != 3:
        raise ValueError(f"expected a 3D (Z, Y, X) label map, got shape {seg.shape}")
    expected = tuple(properties.get("shape_after_resampling", seg.shape))
    if tuple(seg.shape) != expected:
        raise ValueError(f"label map shape {seg.shape} differs from the preprocessed shape {expected}")
    out = np.zeros(geometry.shape, dtype=np.uint8)
    crop(out, box)[...] = resample_labels(seg.astype(np.uint8, copy=False), cropped_shape)
    return out


def map_back_probabilities(probs: np.ndarray, properties: dict) -> np.ndarray:
    """Per-class probabilities (C, Z, Y, X) in the preprocessed grid -> the original grid.

    Linear resampling; outside the crop box class 0 (background) has probability 1.
    """
    geometry, box, cropped_shape = _original(properties)
    if probs.ndim != 4:
        raise ValueError(f"expected a 4D (C, Z, Y, X) array, got shape {probs.shape}")
    out = np.zeros((probs.shape[0],) + geometry.shape, dtype=np.float32)
    out[0] = 1.0
    crop(out, box)[...] = resample_probabilities(probs, cropped_shape)
    return out
