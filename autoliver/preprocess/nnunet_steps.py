"""nnU-Net v2's preprocessing and export steps, as its plans describe them, in autoliver terms.

A model trained by nnU-Net sees its data prepared nnU-Net's way, so a model folder from
nnU-Net is predicted with these steps, not autoliver's own (``autoliver.preprocess.case``).
Array layout (C, Z, Y, X) float32 (one channel per ``channel_names`` entry), spacings in mm in
the same axis order as the array.

Forward (``prepare``): transpose by ``transpose_forward`` -> crop to the bounding box of the
nonzero voxels of any channel, holes filled -> normalise per channel (``CTNormalization``:
clip to the foreground's 0.5 / 99.5 percentiles of the plans' fingerprint, then subtract its
mean and divide by its std; ``ZScoreNormalization``: the image's own mean / std, inside the
nonzero mask when ``use_mask_for_norm``; ``NoNormalization``; ``RescaleTo01Normalization``)
-> resample to the configuration's spacing (shape ``round(n * old / new)``).

Resampling follows nnU-Net's ``resample_data_or_seg_to_shape``: a separate low-resolution axis
when either spacing's largest / smallest ratio is above 3 (unless ``force_separate_z`` says
otherwise) and exactly one axis has the largest spacing; then each slice is resized in-plane
with order ``order`` and the slices are combined with ``order_z`` (0: nearest). Otherwise one
resize of the whole volume with ``order``. Its resize is scikit-image's ``resize``
(``mode='edge'``, no anti-aliasing): a spline of that order on voxel centres (SciPy
``zoom``, ``grid_mode=True``, ``mode='nearest'``), clipped to the input's range. Spline
order 3 (the data) uses exactly that; order 1 (the logits on export) is separable linear
interpolation on voxel centres with replicated borders, which is what
``autoliver.preprocess.resample.resample_to_shape`` computes (float32, in chunks), so that is
used there.

Back (``export_labels``): the logits resampled to the cropped shape at the original spacing ->
argmax -> pasted into the uncropped grid (background outside) -> transposed back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from autoliver.core.errors import PlanError
from autoliver.preprocess.resample import resample_to_shape

ANISO_THRESHOLD = 3.0
NORMALISATIONS = ("CTNormalization", "ZScoreNormalization", "NoNormalization", "RescaleTo01Normalization")


@dataclass(frozen=True)
class Prepared:
    """A case in the network's grid and what maps it back."""

    data: np.ndarray  # (C, Z, Y, X) float32, normalised, in the configuration's spacing
    shape_before_cropping: tuple[int, ...]  # transposed axes
    bbox: tuple[tuple[int, int], ...]  # crop box in the transposed, uncropped grid
    shape_after_cropping: tuple[int, ...]
    spacing: tuple[float, ...]  # original spacing, transposed
    network_spacing: tuple[float, ...]  # the grid of ``data`` (3 values; a 2d configuration keeps the original first one)


def compute_new_shape(shape: Sequence[int], old_spacing: Sequence[float], new_spacing: Sequence[float]) -> tuple[int, ...]:
    return tuple(int(round(o / n * s)) for o, n, s in zip(old_spacing, new_spacing, shape))


def nonzero_box(data: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Bounding box [lo, hi) per axis of the voxels nonzero in any channel (holes filled;
    the whole grid when there are none)."""
    mask = np.any(data != 0, axis=0)
    mask = ndimage.binary_fill_holes(mask)
    if not mask.any():
        return tuple((0, int(s)) for s in mask.shape)
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        box.append((int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)


def normalise(channel: np.ndarray, scheme: str, props: Mapping | None, use_mask: bool, mask: np.ndarray | None,
              where: str = "plans.json") -> np.ndarray:
    """One channel (Z, Y, X) float32 normalised as nnU-Net's ``scheme`` does (in place where possible)."""
    image = np.asarray(channel, dtype=np.float32)
    if scheme == "CTNormalization":
        if not props or any(k not in props for k in ("mean", "std", "percentile_00_5", "percentile_99_5")):
            raise PlanError(f"{where}: CTNormalization needs foreground_intensity_properties_per_channel "
                            "(mean, std, percentile_00_5, percentile_99_5); re-export the model with its plans.json")
        np.clip(image, props["percentile_00_5"], props["percentile_99_5"], out=image)
        image -= props["mean"]
        image /= max(float(props["std"]), 1e-8)
        return image
    if scheme == "ZScoreNormalization":
        if use_mask and mask is not None:
            inside = image[mask]
            mean, std = inside.mean(), inside.std()
            image[mask] = (image[mask] - mean) / max(float(std), 1e-8)
            return image
        mean, std = image.mean(), image.std()
        image -= mean
        image /= max(float(std), 1e-8)
        return image
    if scheme == "NoNormalization":
        return image
    if scheme == "RescaleTo01Normalization":
        image -= image.min()
        image /= np.clip(image.max(), a_min=1e-8, a_max=None)
        return image
    raise PlanError(f"{where}: normalisation {scheme!r} is not supported (supported: {', '.join(NORMALISATIONS)})")


def separate_axis(current: Sequence[float], new: Sequence[float], force_separate_z: bool | None,
                  threshold: float = ANISO_THRESHOLD) -> int | None:
    """The axis resampled on its own (nnU-Net's rule), or None."""
    def lowres(spacing):
        return np.where(max(spacing) / np.asarray(spacing, dtype=float) == 1)[0]

    def anisotropic(spacing):
        return max(spacing) / min(spacing) > threshold

    if force_separate_z is not None:
        axes = lowres(current) if force_separate_z else None
    elif anisotropic(current):
        axes = lowres(current)
    elif anisotropic(new):
        axes = lowres(new)
    else:
        axes = None
    if axes is None or len(axes) != 1:
        return None
    return int(axes[0])


def spline_resize(volume: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """scikit-image's ``resize(volume, shape, order, mode='edge', anti_aliasing=False)`` in
    float64: a spline on voxel centres, borders replicated, clipped to the input's range."""
    shape = tuple(int(s) for s in shape)
    v = np.asarray(volume, dtype=np.float64)
    if v.shape == shape:
        return v.copy()
    zoom = [o / i for o, i in zip(shape, v.shape)]
    out = ndimage.zoom(v, zoom, order=order, mode="nearest", grid_mode=True)
    if out.shape != shape:  # rounding of shape * zoom; never seen, but cheap to make sure
        raise RuntimeError(f"resize to {shape} gave {out.shape}")
    np.clip(out, v.min(), v.max(), out=out)
    return out


def _along_axis(volume: np.ndarray, n_out: int, order: int) -> np.ndarray:
    """Resample axis 0 of ``volume`` to ``n_out`` (voxel centres, replicated border), order 0 or 1."""
    n_in = volume.shape[0]
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    if order == 0:
        return volume[np.clip(np.floor(src + 0.5), 0, n_in - 1).astype(np.int64)]
    if order != 1:
        raise ValueError(f"order_z must be 0 or 1, got {order}")
    i0 = np.floor(src)
    t = (src - i0)
    i0 = i0.astype(np.int64)
    lo, hi = np.clip(i0, 0, n_in - 1), np.clip(i0 + 1, 0, n_in - 1)
    shape = (-1,) + (1,) * (volume.ndim - 1)
    return volume[lo] * (1 - t).reshape(shape) + volume[hi] * t.reshape(shape)


def resample_channel(volume: np.ndarray, shape: Sequence[int], axis: int | None, order: int, order_z: int,
                     out_dtype=np.float32) -> np.ndarray:
    """One (Z, Y, X) channel resampled as nnU-Net does (module docstring)."""
    shape = tuple(int(s) for s in shape)
    if tuple(volume.shape) == shape:
        return np.asarray(volume, dtype=out_dtype)
    if order == 1 and order_z in (0, 1):  # linear: autoliver's chunked float32 resampler is the same maths
        if axis is None:
            return resample_to_shape(volume, shape, 1, 1, out_dtype)
        moved = np.moveaxis(volume, axis, 0)
        target = (shape[axis],) + tuple(s for a, s in enumerate(shape) if a != axis)
        return np.moveaxis(resample_to_shape(np.ascontiguousarray(moved), target, 1, order_z, out_dtype), 0, axis)
    if axis is None:
        return spline_resize(volume, shape, order).astype(out_dtype)
    moved = np.moveaxis(np.asarray(volume), axis, 0)
    inplane = tuple(s for a, s in enumerate(shape) if a != axis)
    slices = np.stack([spline_resize(s, inplane, order) for s in moved])
    if slices.shape[0] != shape[axis]:
        slices = _along_axis(slices, shape[axis], order_z)
    return np.moveaxis(slices, 0, axis).astype(out_dtype)


def resample(data: np.ndarray, shape: Sequence[int], current: Sequence[float], new: Sequence[float], kwargs: Mapping,
             out_dtype=np.float32) -> np.ndarray:
    """(C, Z, Y, X) -> (C, *shape) with the plans' ``resampling_fn_*_kwargs`` (order, order_z,
    force_separate_z)."""
    if kwargs.get("is_seg"):
        raise PlanError("segmentation resampling is not used for prediction")
    axis = separate_axis(current, new, kwargs.get("force_separate_z"))
    order, order_z = int(kwargs.get("order", 3)), int(kwargs.get("order_z", 0))
    return np.stack([resample_channel(c, shape, axis, order, order_z, out_dtype) for c in data])


def prepare(image: np.ndarray, spacing: Sequence[float], plans: Mapping, configuration: Mapping,
            where: str = "plans.json") -> Prepared:
    """(C, Z, Y, X) image in its own grid -> the network's input (module docstring)."""
    fwd = [int(a) for a in plans.get("transpose_forward", [0, 1, 2])]
    data = np.asarray(image, dtype=np.float32).transpose([0, *[a + 1 for a in fwd]])
    spacing_t = tuple(float(spacing[a]) for a in fwd)
    before = tuple(int(s) for s in data.shape[1:])
    box = nonzero_box(data)
    data = np.ascontiguousarray(data[(slice(None), *(slice(a, b) for a, b in box))])
    mask = None
    schemes = list(configuration["normalization_schemes"])
    use_mask = list(configuration.get("use_mask_for_norm", [False] * len(schemes)))
    if any(use_mask):
        mask = ndimage.binary_fill_holes(np.any(data != 0, axis=0))
    props = plans.get("foreground_intensity_properties_per_channel", {})
    if len(schemes) != data.shape[0]:
        raise PlanError(f"{where}: {len(schemes)} normalisation schemes for {data.shape[0]} input channels")
    for c, scheme in enumerate(schemes):
        data[c] = normalise(data[c], scheme, props.get(str(c)), bool(use_mask[c]), mask, where)
    target = [float(s) for s in configuration["spacing"]]
    if len(target) < 3:  # a 2d configuration keeps the original out-of-plane spacing
        target = [spacing_t[0], *target]
    after = tuple(int(s) for s in data.shape[1:])
    new_shape = compute_new_shape(after, spacing_t, target)
    data = resample(data, new_shape, spacing_t, target, configuration.get("resampling_fn_data_kwargs", {}))
    return Prepared(data, before, box, after, spacing_t, tuple(target))


def logits_to_cropped_grid(logits: np.ndarray, prepared: Prepared, configuration: Mapping) -> np.ndarray:
    """Network-grid logits (K, Z, Y, X) -> (K, *shape_after_cropping) float32 at the original
    spacing, with the plans' ``resampling_fn_probabilities_kwargs`` (linear)."""
    kwargs = configuration.get("resampling_fn_probabilities_kwargs", {"order": 1, "order_z": 0, "force_separate_z": None})
    return resample(logits, prepared.shape_after_cropping, prepared.network_spacing, prepared.spacing, kwargs)


def uncrop_and_transpose_back(labels: np.ndarray, prepared: Prepared, plans: Mapping) -> np.ndarray:
    """Labels in the cropped grid -> the input's own grid (background outside the crop box)."""
    out = np.zeros(prepared.shape_before_cropping, dtype=labels.dtype)
    out[tuple(slice(a, b) for a, b in prepared.bbox)] = labels
    back = [int(a) for a in plans.get("transpose_backward", [0, 1, 2])]
    return np.ascontiguousarray(out.transpose(back))
