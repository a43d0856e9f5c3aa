"""Augmentation: image/label alignment, label values, reproducibility, nnU-Net-like settings."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from autoliver.data import augment as aug
from autoliver.data.batches import BatchMaker, BatchSpec
from autoliver.preprocess.case import class_locations, component_locations
from autoliver.preprocess.storage import save_case

T1, T2 = 0.0, 0.8  # label = (image > T1) + (image > T2)


@pytest.fixture(scope="module")
def smooth_case(tmp_path_factory):
    """A smooth random image whose label is a threshold of it: any misalignment shows."""
    rng = np.random.default_rng(0)
    image = ndimage.gaussian_filter(rng.normal(size=(40, 80, 80)), 4.0)
    image = (image / image.std()).astype(np.float32)
    label = ((image > T1).astype(np.uint8) + (image > T2)).astype(np.uint8)
    folder = tmp_path_factory.mktemp("smooth")
    r = np.random.default_rng(1)
    save_case(folder, "s", image.astype(np.float16), label,
              {"class_locations": class_locations(label, r), "tumour_components": component_locations(label, r)})
    return folder


def spatial_only(patch, **kw) -> aug.AugmentSettings:
    """Spatial transforms always on, intensity transforms off (they would move the thresholds)."""
    return replace(aug.default_settings(patch), p_rotation=1.0, p_scale=1.0, p_noise=0.0, p_blur=0.0,
                   p_brightness=0.0, p_contrast=0.0, p_lowres=0.0, p_gamma=0.0, p_gamma_inverted=0.0, **kw)


def agreement(data: np.ndarray, seg: np.ndarray) -> float:
    """Share of voxels, away from the thresholds, whose label matches the thresholded image."""
    expected = (data > T1).astype(np.int64) + (data > T2)
    clear = (np.abs(data - T1) > 0.1) & (np.abs(data - T2) > 0.1)
    return float((expected == seg)[clear].mean())


@pytest.mark.parametrize("dims,patch,in_slices,elastic", [
    (3, (24, 40, 40), 1, False),  # isotropic 3D: rotation about every axis
    (3, (8, 48, 48), 1, False),  # anisotropic: dummy 2D, in-plane rotation only
    (2, (48, 48), 3, False),  # 2.5d
    (3, (24, 40, 40), 1, True),  # with elastic deformation
])
def test_augmented_label_stays_aligned_with_image(smooth_case, dims, patch, in_slices, elastic):
    settings = spatial_only(patch, elastic=elastic, p_elastic=1.0)
    spec = BatchSpec(smooth_case, ("s",), dims, patch, 4, in_slices=in_slices, oversample_foreground=0.5,
                     settings=settings, pad_value=-5.0)
    maker = BatchMaker(spec)
    rng = np.random.default_rng(3)
    for _ in range(3):
        batch = maker.batch(rng)
        data, target = batch["data"], batch["target"]
        assert data.shape == (4, in_slices) + patch and data.dtype == np.float32
        assert target.shape == (4, 1) + patch and target.dtype == np.int64
        assert set(np.unique(target)) <= {0, 1, 2}
        centre = data[:, in_slices // 2]
        assert agreement(centre, target[:, 0]) > 0.97
        # the check can fail: a label mirrored against its image does not agree
        assert agreement(centre, target[:, 0, ..., ::-1]) < 0.9


def test_spatial_draw_reads_exactly_the_patch_when_untransformed():
    coords = aug.create_zero_centered_coordinate_mesh((4, 6, 8))
    start, size, local = aug.grid_region(coords, (10.5, 20.5, 30.5))
    np.testing.assert_array_equal(start, np.array([9, 18, 27]) - aug.MARGIN)
    np.testing.assert_array_equal(size, np.array([4, 6, 8]) + 2 * aug.MARGIN)
    assert local.min() >= aug.MARGIN - 1e-9 and (local.max(axis=(1, 2, 3)) <= size - 1 - aug.MARGIN + 1e-9).all()
    draw = aug.SpatialDraw(angles=(0.7, 0.0, 0.0), scale=1.3, elastic=None, seed=0)
    grid = aug.sampling_grid((4, 6, 8), draw)
    start, size, local = aug.grid_region(grid, (0.0, 0.0, 0.0))
    assert (local.min(axis=(1, 2, 3)) >= aug.MARGIN - 1e-9).all() and (local.max(axis=(1, 2, 3)) <= size - 1 - aug.MARGIN + 1e-9).all()
    np.testing.assert_allclose(grid[0], coords[0] * 1.3)  # rotation about axis 0 keeps z


def test_default_settings_follow_nnunet():
    iso = aug.default_settings((64, 128, 128))
    assert iso.spatial_dims == 3 and not iso.dummy_2d and len(iso.rotation) == 3
    assert iso.rotation[0] == pytest.approx((-np.pi / 6, np.pi / 6))
    aniso = aug.default_settings((16, 160, 160))
    assert aniso.dummy_2d and aniso.spatial_dims == 2 and aniso.rotation[0] == pytest.approx((-np.pi, np.pi))
    flat = aug.default_settings((128, 128))
    assert flat.spatial_dims == 2 and flat.mirror_axes == (0, 1) and iso.mirror_axes == (0, 1, 2)
    assert not iso.elastic and iso.p_rotation == 0.2 and iso.p_scale == 0.2 and iso.scale == (0.7, 1.4)
    with pytest.raises(ValueError):
        aug.default_settings((5,))


def test_draw_probabilities():
    settings = aug.default_settings((64, 128, 128))
    rng = np.random.default_rng(0)
    draws = [aug.draw_spatial(settings, rng) for _ in range(4000)]
    none = sum(d is None for d in draws) / len(draws)
    assert abs(none - 0.8 * 0.8) < 0.03  # p_rotation 0.2, p_scale 0.2, independent
    scales = np.array([d.scale for d in draws if d is not None and d.scale != 1.0])
    assert scales.min() >= 0.7 and scales.max() <= 1.4 and 0.4 < (scales < 1).mean() < 0.6


def test_augment_batch_is_reproducible_and_leaves_global_state_alone():
    settings = replace(aug.default_settings((16, 24, 24)), p_noise=1.0, p_gamma=1.0, p_blur=1.0)
    rng = np.random.default_rng(0)
    data = rng.normal(size=(3, 1, 16, 24, 24)).astype(np.float32)
    seg = (data > 0).astype(np.uint8)
    np.random.seed(123)
    random.seed(123)
    before_np, before_py = np.random.get_state()[1].copy(), random.getstate()
    out1 = aug.augment_batch(data, seg, settings, np.random.default_rng(7))
    out2 = aug.augment_batch(data, seg, settings, np.random.default_rng(7))
    out3 = aug.augment_batch(data, seg, settings, np.random.default_rng(8))
    np.testing.assert_array_equal(out1[0], out2[0])
    np.testing.assert_array_equal(out1[1], out2[1])
    assert not np.array_equal(out1[0], out3[0])
    assert not np.array_equal(out1[0], data)  # the transforms did something
    np.testing.assert_array_equal(np.random.get_state()[1], before_np)
    assert random.getstate() == before_py
    # mirroring alone moves image and label together
    mirror_only = replace(settings, p_noise=0.0, p_blur=0.0, p_brightness=0.0, p_contrast=0.0, p_lowres=0.0,
                          p_gamma=0.0, p_gamma_inverted=0.0)
    d, s = aug.augment_batch(data, seg, mirror_only, np.random.default_rng(1))
    np.testing.assert_array_equal(s, (d > 0).astype(np.uint8))
    assert not np.array_equal(d, data) and np.array_equal(np.sort(d, axis=None), np.sort(data, axis=None))
    with pytest.raises(ValueError):
        aug.augment_batch(data, seg[:2], settings, rng)
