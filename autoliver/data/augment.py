"""Data augmentation with batchgenerators, nnU-Net v2's transforms and probabilities.

Two parts:

1. Spatial (per sample, before the patch is read): rotation (p 0.2; +-30 degrees about each
   axis in 3D, +-180 degrees in plane for 2D and for anisotropic 3D patches — nnU-Net's
   "dummy 2D": z extent < 1/3 of the in-plane extent), scaling (p 0.2, factor in 0.7-1.4),
   elastic deformation (off by default). The random transform is drawn FIRST, then the
   bounding box of the transformed sampling grid says exactly which region of the volume
   to read (nnU-Net reads a fixed enlarged patch for every sample): about two thirds of the
   samples get no spatial transform and read just the patch, and a rotated patch never
   samples outside what was read, so rotation adds no border artefacts. Data are interpolated
   linearly (torch grid_sample, as nnU-Net v2), labels by per-label linear interpolation
   (values stay within the input's labels).
2. Per batch (after the patches are cut): Gaussian noise (p 0.1), Gaussian blur (p 0.1),
   multiplicative brightness (p 0.15), contrast (p 0.15), simulated low resolution
   (p 0.125, in plane only for dummy 2D), inverted gamma (p 0.1), gamma (p 0.3), mirroring
   (p 0.5 per axis). nnU-Net draws blur and low resolution with p_per_sample x p_per_channel
   (0.2 x 0.5, 0.25 x 0.5) per channel; here the product applies once per sample and every
   channel gets the same intensity change — identical for one CT channel, and for 2.5d the k
   slice channels stay one consistent image. Intensity transforms see only the image channels,
   never the cascade's previous-stage channels.

Reproducibility: batchgenerators draws from numpy's and Python's global generators. Every
call here draws a seed from the ``np.random.Generator`` it is given, seeds both global
generators with it, and restores their previous states afterwards.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from batchgenerators.augmentations.utils import (
    create_zero_centered_coordinate_mesh,
    elastic_deform_coordinates,
    rotate_coords_2d,
    rotate_coords_3d,
    scale_coords,
)
from batchgenerators.transforms.abstract_transforms import Compose
from batchgenerators.transforms.color_transforms import (
    BrightnessMultiplicativeTransform,
    ContrastAugmentationTransform,
    GammaTransform,
)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform

ANISO_THRESHOLD = 3.0  # nnU-Net: dummy 2D when max(patch) / patch[0] > 3
MARGIN = 3  # voxels read beyond the transformed grid's bounding box (cubic spline support)
DEG = math.pi / 180.0


@dataclass(frozen=True)
class AugmentSettings:
    """Augmentation parameters; ``default_settings`` gives nnU-Net v2's."""

    spatial_dims: int  # 2 or 3: axes the spatial transform acts on (2 for 2D and dummy 2D)
    dummy_2d: bool
    rotation: tuple[tuple[float, float], ...]  # radians; 1 range (2D) or 3 (about z, y, x axes)
    mirror_axes: tuple[int, ...]
    p_rotation: float = 0.2
    p_scale: float = 0.2
    scale: tuple[float, float] = (0.7, 1.4)
    elastic: bool = False
    p_elastic: float = 0.2
    elastic_alpha: tuple[float, float] = (0.0, 900.0)
    elastic_sigma: tuple[float, float] = (9.0, 13.0)
    p_noise: float = 0.1
    noise_variance: tuple[float, float] = (0.0, 0.1)
    p_blur: float = 0.1
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_brightness: float = 0.15
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    p_lowres: float = 0.125
    lowres_zoom: tuple[float, float] = (0.5, 1.0)
    p_gamma_inverted: float = 0.1
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)


def default_settings(patch_size: Sequence[int], elastic: bool = False) -> AugmentSettings:
    """nnU-Net v2's settings for a (y, x) or (z, y, x) patch."""
    patch = tuple(int(p) for p in patch_size)
    if len(patch) not in (2, 3):
        raise ValueError(f"patch_size must be (y, x) or (z, y, x), got {patch_size}")
    dummy = len(patch) == 3 and max(patch) / patch[0] > ANISO_THRESHOLD
    if len(patch) == 2 or dummy:
        rot: tuple[tuple[float, float], ...] = ((-180 * DEG, 180 * DEG),)
        spatial = 2
    else:
        rot = ((-30 * DEG, 30 * DEG),) * 3
        spatial = 3
    return AugmentSettings(spatial_dims=spatial, dummy_2d=dummy, rotation=rot,
                           mirror_axes=tuple(range(len(patch))), elastic=elastic)


@dataclass(frozen=True)
class SpatialDraw:
    """One sample's spatial transform: rotation angles (radians), isotropic scale, elastic."""

    angles: tuple[float, ...]
    scale: float
    elastic: tuple[float, float] | None  # (alpha, sigma)
    seed: int  # for the elastic noise field


@contextmanager
def seeded_globals(seed: int):
    """Seed numpy's and Python's global generators for batchgenerators; restore them after."""
    np_state, py_state = np.random.get_state(), random.getstate()
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def draw_spatial(settings: AugmentSettings, rng: np.random.Generator) -> SpatialDraw | None:
    """The spatial transform of one sample, or None when it gets none (read the patch as is)."""
    rotate = rng.random() < settings.p_rotation
    scale = rng.random() < settings.p_scale
    elastic = settings.elastic and rng.random() < settings.p_elastic
    if not (rotate or scale or elastic):
        return None
    angles = tuple(float(rng.uniform(lo, hi)) if rotate else 0.0 for lo, hi in settings.rotation)
    s = 1.0
    if scale:
        lo, hi = settings.scale
        s = float(rng.uniform(lo, 1.0)) if lo < 1.0 and rng.random() < 0.5 else float(rng.uniform(max(lo, 1.0), hi))
    el = (float(rng.uniform(*settings.elastic_alpha)), float(rng.uniform(*settings.elastic_sigma))) if elastic else None
    return SpatialDraw(angles, s, el, int(rng.integers(2**32)))


def sampling_grid(size: Sequence[int], draw: SpatialDraw) -> np.ndarray:
    """Coordinates (len(size), *size) around 0 where the output patch samples its input."""
    coords = create_zero_centered_coordinate_mesh(tuple(int(s) for s in size))
    if draw.elastic is not None:
        with seeded_globals(draw.seed):
            coords = elastic_deform_coordinates(coords, *draw.elastic)
    if len(size) == 3:
        coords = rotate_coords_3d(coords, *draw.angles)
    else:
        coords = rotate_coords_2d(coords, draw.angles[0])
    if draw.scale != 1.0:
        coords = scale_coords(coords, draw.scale)
    return coords


def grid_region(coords: np.ndarray, centre: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, size, local coords): the integer region around ``centre`` that holds ``coords``."""
    axes = tuple(range(1, coords.ndim))
    lo = np.floor(coords.min(axis=axes) + np.asarray(centre)).astype(np.int64) - MARGIN
    hi = np.ceil(coords.max(axis=axes) + np.asarray(centre)).astype(np.int64) + MARGIN + 1
    shift = (np.asarray(centre, dtype=np.float64) - lo).reshape((-1,) + (1,) * len(axes))
    return lo, hi - lo, coords + shift


def _normalised_grid(coords: np.ndarray, region: Sequence[int]) -> torch.Tensor:
    """Voxel coordinates (r, *out) in a region of shape ``region`` -> grid_sample's grid
    (1, *out, r) in [-1, 1] (align_corners=True), last axis ordered x, y(, z)."""
    r = coords.shape[0]
    scale = np.array([2.0 / max(n - 1, 1) for n in region], dtype=np.float32).reshape((r,) + (1,) * r)
    grid = coords.astype(np.float32) * scale - 1.0
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(grid[::-1], 0, -1)))[None]


def resample(data: np.ndarray, seg: np.ndarray, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Interpolate each (C, ..., *region) image at ``coords`` over its last ``len(coords)`` axes.

    Leading axes (channels, and z for dummy 2D) are batched. Data: linear (torch
    ``grid_sample``, border values outside); labels: linear interpolation of each label's
    one-hot mask, then the most likely label (values outside the region are background), so
    only input label values come out. Linear rather than cubic data interpolation, as in
    nnU-Net v2's own spatial transform: three to five times faster, and augmentation needs no
    more.
    """
    r = coords.shape[0]
    region = data.shape[-r:]
    grid = _normalised_grid(coords, region)
    lead_d, lead_s = data.shape[:-r], seg.shape[:-r]
    with torch.no_grad():
        d = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).reshape((1, -1) + region)
        out_d = F.grid_sample(d, grid, mode="bilinear", padding_mode="border", align_corners=True)
        labels = np.unique(seg)
        s = torch.from_numpy(np.ascontiguousarray(seg)).reshape((-1,) + region)
        onehot = torch.stack([(s == int(v)).float() for v in labels], dim=1)  # (S, L, *region)
        n = onehot.shape[0]
        probs = F.grid_sample(onehot.reshape((1, -1) + region), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        probs = probs.reshape((n, len(labels)) + tuple(coords.shape[1:]))
        # outside the region every label's weight is 0: the argmax then falls on index 0 of
        # ``labels`` — background when present; force it anyway for padded voxels
        idx = probs.argmax(dim=1)
        out_s = torch.from_numpy(labels.astype(seg.dtype))[idx]
        out_s[probs.sum(dim=1) < 0.5] = 0
    return (out_d.reshape(lead_d + tuple(coords.shape[1:])).numpy(),
            out_s.reshape(lead_s + tuple(coords.shape[1:])).numpy())


@lru_cache(maxsize=8)
def batch_transforms(settings: AugmentSettings) -> Compose:
    """The per-batch transforms (batchgenerators Compose) for ``settings``."""
    s = settings
    return Compose([
        GaussianNoiseTransform(s.noise_variance, p_per_sample=s.p_noise, p_per_channel=1, per_channel=False),
        GaussianBlurTransform(s.blur_sigma, different_sigma_per_channel=False, p_per_channel=1, p_per_sample=s.p_blur),
        BrightnessMultiplicativeTransform(s.brightness, per_channel=False, p_per_sample=s.p_brightness),
        ContrastAugmentationTransform(s.contrast, preserve_range=True, per_channel=False, p_per_sample=s.p_contrast),
        SimulateLowResolutionTransform(s.lowres_zoom, per_channel=False, p_per_channel=1, order_downsample=0,
                                       order_upsample=3, p_per_sample=s.p_lowres,
                                       ignore_axes=(0,) if s.dummy_2d else None),
        GammaTransform(s.gamma, invert_image=True, per_channel=False, retain_stats=True, p_per_sample=s.p_gamma_inverted),
        GammaTransform(s.gamma, invert_image=False, per_channel=False, retain_stats=True, p_per_sample=s.p_gamma),
        MirrorTransform(s.mirror_axes),
    ])


def augment_batch(data: np.ndarray, seg: np.ndarray, settings: AugmentSettings,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Intensity transforms on ``data`` (B, C, *spatial) float32, mirroring on both ``data``
    and ``seg`` (B, S, *spatial). Returns new arrays; reproducible from ``rng``."""
    if data.shape[0] != seg.shape[0] or data.shape[2:] != seg.shape[2:]:
        raise ValueError(f"data {data.shape} and seg {seg.shape} must share batch and spatial shape")
    with seeded_globals(int(rng.integers(2**32))):
        out = batch_transforms(settings)(data=data.copy(), seg=seg.copy())
    return np.ascontiguousarray(out["data"], dtype=np.float32), np.ascontiguousarray(out["seg"])
