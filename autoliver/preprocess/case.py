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

A data identifier with voxel-changing options (``plans.data_preprocessing``, a recipe's data
folder) runs crop -> resample HU to its target spacing (``inplane_factor`` is already in that
spacing) -> ``intensity.apply_options`` (smoothing -> intensity mapping -> histogram
equalisation / CLAHE, in the target grid, as the papers describe). A planned identifier keeps
crop -> CT normalisation -> resample, bit for bit. Labels are resampled alike for both, and
the properties record the options, their hash (``preprocessing_hash``: the runner redoes a
case made with other options) and ``pad_value`` (``normalise.pad_value_for``; for a per-image
z-score, the minimum of the case's data).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from scipy import ndimage

from autoliver.core.labels import LIVER, TUMOUR
from autoliver.io.images import Geometry
from autoliver.preprocess.intensity import apply_options, needs_body_mask, options_for, options_hash
from autoliver.preprocess.normalise import normalise_ct, pad_is_recorded, pad_value_for
from autoliver.preprocess.properties import CaseProperties
from autoliver.preprocess.resample import (
    axis_weights,
    is_anisotropic,
    new_shape_for,
    resample_labels,
    resample_to_shape,
)
from planning.crop import BODY_THRESHOLD_HU, bbox_of, body_bbox, box_shape, crop
from planning.plans import Plans

log = logging.getLogger(__name__)

N_LOCATIONS = 10000  # sampled voxels per class
PER_COMPONENT = 10  # sampled voxels per tumour component
TUMOUR_LABEL = 2
SAMPLED_CLASSES = (LIVER, TUMOUR)
DATA_DTYPE = np.float16
FLOAT16_SAFE = 60000.0
CHUNK_SLICES_VOXELS = 1024 * 1024  # output voxels per chunk when mapping probabilities back


def crop_to_body(image: np.ndarray, label: np.ndarray | None):
    """Crop image (and label) to the body box. Returns (image view, cropped uint8 label or None, box)."""
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
    seg = None if label is None else np.ascontiguousarray(crop(label, box))
    return crop(image, box), seg, box


def crop_and_normalise(image: np.ndarray, label: np.ndarray | None, plans: Plans):
    """Crop image (and label) to the body box and normalise the image (a planned identifier:
    the CT normalisation happens before resampling).

    Returns (normalised float32 image, cropped uint8 label or None, box).
    """
    cropped, seg, box = crop_to_body(image, label)
    return apply_options(cropped, {}, plans.normalisation), seg, box


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


def resample_normalised(cropped_hu: np.ndarray, seg: np.ndarray | None, spacing: Sequence[float], target: Sequence[float],
                        normalisation) -> tuple[np.ndarray, np.ndarray | None]:
    """``resample_cropped(normalise_ct(cropped_hu), seg, ...)`` bit for bit, with the CT
    normalisation applied to the slices as the resampling reads them: no full-size float32
    copy of the scan (1.3 GB for a 640 x 512 x 512 CT)."""
    def norm(a: np.ndarray) -> np.ndarray:
        return normalise_ct(a, normalisation)

    shape = new_shape_for(cropped_hu.shape, spacing, target)
    if shape == tuple(cropped_hu.shape) or not cropped_hu.size:
        return resample_cropped(norm(cropped_hu), seg, spacing, target)
    ends = norm(np.array([cropped_hu.min(), cropped_hu.max()], dtype=cropped_hu.dtype))  # the normalised extremes
    order_z = 1 if is_anisotropic(spacing, target) else 3
    out = resample_to_shape(cropped_hu, shape, 3, order_z, _data_dtype(ends), clip_to_input_range=True, pointwise=norm)
    return out, None if seg is None else resample_labels(seg, shape)


def resample_hu(cropped: np.ndarray, spacing: Sequence[float], target: Sequence[float]) -> np.ndarray:
    """Cropped HU -> float32 in the target grid, with the interpolation ``resample_cropped``
    uses (cubic in-plane, cubic or, when anisotropic, linear along z, overshoot clipped to the
    input's HU range)."""
    shape = new_shape_for(cropped.shape, spacing, target)
    if shape == tuple(cropped.shape):
        return np.array(cropped, dtype=np.float32)
    order_z = 1 if is_anisotropic(spacing, target) else 3
    return resample_to_shape(cropped, shape, 3, order_z, np.float32, clip_to_input_range=True)


def _with_options(cropped: np.ndarray, cropped_seg: np.ndarray | None, spacing: Sequence[float], target: Sequence[float],
                  options: dict, plans: Plans, cache: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """A derived identifier: resample HU to ``target``, then ``apply_options`` there; the
    label resampled as for a planned identifier. ``cache`` keeps the last resampled HU (and
    its body mask), shared by identifiers of the same spacing."""
    key = tuple(float(t) for t in target)
    if cache.get("key") != key:
        cache.clear()
        cache.update(key=key, hu=resample_hu(cropped, spacing, target), body=None)
    hu = cache["hu"]
    body = None
    if needs_body_mask(options):
        if cache["body"] is None:
            cache["body"] = hu > np.float32(BODY_THRESHOLD_HU)
        body = cache["body"]
    data = apply_options(hu, options, plans.normalisation, body)
    out = data.astype(_data_dtype(data), copy=False)
    out_seg = None if cropped_seg is None else resample_labels(cropped_seg, data.shape)
    return out, out_seg


def iter_preprocessed(image: np.ndarray, geometry: Geometry, label: np.ndarray | None, plans: Plans,
                      data_identifiers: Sequence[str], seed: int = 0) -> Iterator[tuple[str, np.ndarray, np.ndarray | None, dict]]:
    """Crop once, then yield (identifier, data, seg, properties) per identifier.

    A planned identifier (no ``plans.data_preprocessing`` entry): the cropped image is
    CT-normalised once (shared by every planned identifier), then resampled. An identifier
    with options: the cropped HU is resampled to its spacing, then smoothed / mapped /
    equalised there (``intensity.apply_options``). Labels are resampled alike in both.
    """
    if tuple(image.shape) != tuple(geometry.shape):
        raise ValueError(f"image shape {image.shape} differs from its geometry's {geometry.shape}")
    unknown = [d for d in data_identifiers if d not in plans.data_spacings]
    if unknown:
        raise ValueError(f"data identifiers {unknown} not in the plan (has {sorted(plans.data_spacings)})")
    cropped_hu, cropped_seg, box = crop_to_body(image, label)
    cache: dict = {}
    for ident in data_identifiers:
        target = tuple(float(s) for s in plans.data_spacings[ident])
        options = options_for(plans, ident)
        if options:
            data, seg = _with_options(cropped_hu, cropped_seg, geometry.spacing, target, options, plans, cache)
        else:  # CT normalisation (pointwise) fused into the resampling
            data, seg = resample_normalised(cropped_hu, cropped_seg, geometry.spacing, target, plans.normalisation)
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
            "preprocessing": options,
            "preprocessing_hash": options_hash(options),
            "pad_value": float(data.min()) if pad_is_recorded(plans, ident) and data.size else pad_value_for(plans, ident),
        }
        if seg is not None:
            rng = np.random.default_rng(seed)
            props["class_locations"] = class_locations(seg, rng)
            props["tumour_components"] = component_locations(seg, rng)
        yield ident, data, seg, props
    cache.clear()


def preprocess_case(image: np.ndarray, geometry: Geometry, label: np.ndarray | None, plans: Plans,
                    data_identifier: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Crop to body, normalise, resample to ``plans.data_spacings[data_identifier]``.

    Returns (data float16 (Z, Y, X), seg uint8 or None, JSON-able properties).
    """
    _, data, seg, props = next(iter_preprocessed(image, geometry, label, plans, [data_identifier], seed))
    return data, seg, props


def _original(properties: Mapping | CaseProperties) -> tuple[Geometry, tuple, tuple[int, int, int]]:
    if isinstance(properties, CaseProperties):
        return properties.geometry, properties.crop_box, properties.shape_after_crop
    geometry = Geometry.from_json(properties["geometry"])
    box = tuple(tuple(int(v) for v in b) for b in properties["crop_box"])
    return geometry, box, tuple(int(v) for v in properties["shape_after_crop"])


def _preprocessed_shape(properties: Mapping | CaseProperties, default: Sequence[int]) -> tuple[int, ...]:
    if isinstance(properties, CaseProperties):
        return properties.shape_after_resampling
    return tuple(int(v) for v in properties.get("shape_after_resampling", default))


def map_back(seg: np.ndarray, properties: Mapping | CaseProperties) -> np.ndarray:
    """A (Z, Y, X) label map in the preprocessed grid -> the original grid (uint8).

    Label-safe resampling to the shape after cropping, then pasted at the crop box into a
    zero volume of the original shape; write it with ``Geometry.from_json(properties["geometry"])``.
    """
    geometry, box, cropped_shape = _original(properties)
    if seg.ndim != 3:
        raise ValueError(f"expected a 3D (Z, Y, X) label map, got shape {seg.shape}")
    expected = _preprocessed_shape(properties, seg.shape)
    if tuple(seg.shape) != expected:
        raise ValueError(f"label map shape {seg.shape} differs from the preprocessed shape {expected}")
    out = np.zeros(geometry.shape, dtype=np.uint8)
    crop(out, box)[...] = resample_labels(seg.astype(np.uint8, copy=False), cropped_shape)
    return out


def _linear_taps(n_in: int, n_out: int, lo: int, hi: int) -> tuple[int, int, np.ndarray, np.ndarray]:
    """The output indices [j0, j1) whose linear taps touch input [lo, hi), and their taps
    (indices (j1 - j0, 2), weights (j1 - j0, 2)) as in ``resample_probabilities``."""
    idx, w = axis_weights(n_in, n_out, 1)
    touched = np.flatnonzero(((idx >= lo) & (idx < hi) & (w != 0)).any(axis=1))
    if touched.size == 0:
        return 0, 0, idx[:0], w[:0]
    j0, j1 = int(touched[0]), int(touched[-1]) + 1
    return j0, j1, idx[j0:j1], w[j0:j1]


def map_back_probabilities(probs: np.ndarray, properties: Mapping | CaseProperties, box: Sequence[Sequence[int]] | None = None,
                           dtype=np.float32) -> np.ndarray:
    """Per-class probabilities (C, Z, Y, X) in the preprocessed grid -> the original grid.

    Linear resampling (as ``resample_probabilities``); outside the crop box class 0
    (background) has probability 1. ``box`` ((z0, z1), (y0, y1), (x0, x1)) in the preprocessed
    grid says where ``probs`` lies (an ROI; outside it the background has probability 1): only
    the original voxels whose interpolation taps reach into it are computed. Work goes class by
    class and in chunks of output slices into the ``dtype`` result, so no float32 copy of the
    whole multi-channel volume is made.
    """
    geometry, crop_box, cropped_shape = _original(properties)
    if probs.ndim != 4:
        raise ValueError(f"expected a 4D (C, Z, Y, X) array, got shape {probs.shape}")
    pre_shape = _preprocessed_shape(properties, probs.shape[1:])
    box = tuple((0, n) for n in pre_shape) if box is None else tuple((int(a), int(b)) for a, b in box)
    if tuple(b - a for a, b in box) != tuple(probs.shape[1:]) or any(a < 0 or b > n for (a, b), n in zip(box, pre_shape)):
        raise ValueError(f"probabilities of shape {probs.shape[1:]} do not fill the box {box} of the preprocessed shape {pre_shape}")
    out = np.zeros((probs.shape[0],) + geometry.shape, dtype=dtype)
    out[0] = 1.0
    taps = [_linear_taps(n_in, n_out, lo, hi) for n_in, n_out, (lo, hi) in zip(pre_shape, cropped_shape, box)]
    if any(j1 == j0 for j0, j1, _, _ in taps):
        return out
    # the input block the taps read: the box plus the constant (background) voxels around it
    src = [(int(t[2].min()), int(t[2].max()) + 1) for t in taps]
    (zj0, zj1, zi, zw), (yj0, yj1, yi, yw), (xj0, xj1, xi, xw) = taps
    yi, xi = yi - src[1][0], xi - src[2][0]
    target = crop(out, crop_box)[:, zj0:zj1, yj0:yj1, xj0:xj1]
    slab = max(1, CHUNK_SLICES_VOXELS // max(1, (yj1 - yj0) * (xj1 - xj0)))
    for c in range(probs.shape[0]):
        fill = 1.0 if c == 0 else 0.0
        for k0 in range(0, zj1 - zj0, slab):
            k1 = min(zj1 - zj0, k0 + slab)
            lo, hi = int(zi[k0:k1].min()), int(zi[k0:k1].max()) + 1
            block = np.full((hi - lo, src[1][1] - src[1][0], src[2][1] - src[2][0]), fill, dtype=np.float32)
            inner = [(max(a, b0), min(b, b1)) for (a, b), (b0, b1) in zip(((lo, hi), src[1], src[2]), box)]
            if all(a < b for a, b in inner):
                block[tuple(slice(a - o, b - o) for (a, b), o in zip(inner, (lo, src[1][0], src[2][0])))] = \
                    probs[(c, *(slice(a - b0, b - b0) for (a, b), (b0, _) in zip(inner, box)))]
            block = block[:, :, xi[:, 0]] * xw[:, 0].astype(np.float32) + block[:, :, xi[:, 1]] * xw[:, 1].astype(np.float32)
            block = block[:, yi[:, 0]] * yw[:, 0, None].astype(np.float32) + block[:, yi[:, 1]] * yw[:, 1, None].astype(np.float32)
            rows = zi[k0:k1] - lo
            w = zw[k0:k1].astype(np.float32)
            target[c, k0:k1] = block[rows[:, 0]] * w[:, 0, None, None] + block[rows[:, 1]] * w[:, 1, None, None]
    return out
