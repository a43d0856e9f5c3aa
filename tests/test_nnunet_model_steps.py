"""nnU-Net's preprocessing, resampling and tiling rules in autoliver (autoliver.preprocess.nnunet_steps,
autoliver.infer.nnunet_window), each checked against a direct SciPy / formula reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from autoliver.infer.nnunet_window import axis_weights, starts_for, tile_starts
from autoliver.preprocess.nnunet_steps import (
    compute_new_shape,
    nonzero_box,
    normalise,
    resample_channel,
    separate_axis,
    spline_resize,
)


def test_tile_starts_follow_the_step_rule():
    assert tile_starts(110, 64, 0.5) == [0, 23, 46]
    assert tile_starts(40, 64, 0.5) == [0]
    for n, p in [(200, 64), (97, 32), (65, 64), (512, 160)]:
        st = tile_starts(n, p, 0.5)
        assert st[0] == 0 and st[-1] == n - p
        assert len(st) == math.ceil((n - p) / (p * 0.5)) + 1
        assert max(b - a for a, b in zip(st, st[1:])) <= p * 0.5 + 1
    assert starts_for((20, 100, 100), (32, 64, 64), 0.5) == [[0], [0, 18, 36], [0, 18, 36]]


def test_importance_weights_are_the_smoothed_impulse():
    patch = (8, 12, 10)
    w = axis_weights(patch)
    full = np.einsum("i,j,k->ijk", *[np.asarray(a) for a in w])
    impulse = np.zeros(patch)
    impulse[tuple(p // 2 for p in patch)] = 1
    ref = ndimage.gaussian_filter(impulse, [p / 8 for p in patch], 0, mode="constant", cval=0)
    ref /= ref.max()
    ref[ref == 0] = ref[ref > 0].min()
    np.testing.assert_allclose(full, ref, rtol=1e-6, atol=1e-12)


def test_linear_resampling_matches_scipy_zoom_on_voxel_centres():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 14, 11)).astype(np.float32)
    for shape in [(13, 20, 7), (5, 9, 16)]:
        ref = ndimage.zoom(x.astype(np.float64), [o / i for o, i in zip(shape, x.shape)], order=1, mode="nearest", grid_mode=True)
        np.testing.assert_allclose(resample_channel(x, shape, None, 1, 0), ref, atol=1e-5)


def test_separate_axis_resampling_matches_slicewise_reference():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 10, 12))
    shape = (12, 7, 9)  # 2x along the separate axis: half-voxel ties for the nearest rule
    inplane = np.stack([ndimage.zoom(s, [7 / 10, 9 / 12], order=1, mode="nearest", grid_mode=True) for s in x])
    coords = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(float)
    coords[0] = (coords[0] + 0.5) * (6 / 12) - 0.5
    ref = ndimage.map_coordinates(inplane, coords, order=0, mode="nearest")
    np.testing.assert_allclose(resample_channel(x.astype(np.float32), shape, 0, 1, 0), ref, atol=1e-5)
    # cubic data path, separate axis 2 this time
    cubic = resample_channel(x, (6, 10, 5), 2, 3, 0)
    ref3 = np.moveaxis(np.stack([np.clip(ndimage.zoom(s, [1, 1], order=3, mode="nearest", grid_mode=True), s.min(), s.max())
                                 for s in np.moveaxis(x, 2, 0)]), 0, 2)
    coords = np.mgrid[:6, :10, :5].astype(float)
    coords[2] = (coords[2] + 0.5) * (12 / 5) - 0.5
    np.testing.assert_allclose(cubic, ndimage.map_coordinates(ref3, coords, order=0, mode="nearest"), atol=1e-5)


def test_spline_resize_is_clipped_to_the_input_range():
    x = np.zeros((8, 8, 8))
    x[3:5, 3:5, 3:5] = 100.0  # a sharp edge: cubic splines overshoot
    out = spline_resize(x, (13, 13, 13), 3)
    assert out.min() >= 0 and out.max() <= 100
    raw = ndimage.zoom(x, 13 / 8, order=3, mode="nearest", grid_mode=True)
    assert raw.min() < 0  # the clip did something


def test_separate_axis_rule():
    assert separate_axis((5.0, 1.0, 1.0), (3.0, 1.5, 1.5), None) == 0
    assert separate_axis((2.0, 0.7, 0.7), (3.0, 1.5, 1.5), None) is None
    assert separate_axis((1.0, 1.0, 1.0), (1.0, 4.0, 1.0), None) == 1
    assert separate_axis((0.24, 1.25, 1.25), (0.24, 1.25, 1.25), None) is None  # two low-resolution axes
    assert separate_axis((1.0, 1.0, 1.0), (1.0, 1.0, 1.0), False) is None


def test_crop_box_and_normalisation():
    data = np.zeros((1, 10, 12, 14), dtype=np.float32)
    data[0, 2:7, 3:9, 4:10] = 5
    data[0, 4, 5, 6] = 0  # a hole does not split the box
    assert nonzero_box(data) == ((2, 7), (3, 9), (4, 10))
    assert nonzero_box(np.zeros((1, 3, 4, 5))) == ((0, 3), (0, 4), (0, 5))
    props = {"mean": 100.0, "std": 50.0, "percentile_00_5": -20.0, "percentile_99_5": 300.0}
    x = np.array([[[-1000.0, 0.0, 100.0, 2000.0]]], dtype=np.float32)
    np.testing.assert_allclose(normalise(x.copy(), "CTNormalization", props, False, None), [[[-2.4, -2.0, 0.0, 4.0]]])
    z = normalise(np.arange(10, dtype=np.float32).reshape(1, 2, 5), "ZScoreNormalization", None, False, None)
    assert abs(z.mean()) < 1e-6 and z.std() == pytest.approx(1, abs=1e-5)
    assert compute_new_shape((26, 48, 48), (5.0, 1.0, 1.0), (3.0, 1.5, 1.5)) == (43, 32, 32)
