"""Dense 3D CRF: fast filters against brute force, mean-field behaviour, ROI and arguments."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from autoliver.evaluate.overlap import case_dice
from autoliver.postprocess.bilateral import bilateral_filter, build_grid, gaussian_filter_mm
from autoliver.postprocess.crf import CRF_PARAM_GRID, dense_crf, liver_box

SPACING = (2.0, 0.8, 0.8)


def brute_force(values, image, spacing, sigma_mm, sigma_intensity=None):
    """sum_j k(i, j) v_j / sum_j k(i, j) over all voxel pairs (O(N^2), float64)."""
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(image.shape, spacing)], indexing="ij")
    e = np.zeros((image.size, image.size))
    for f, scale in [(g.ravel(), sigma_mm) for g in grids] + ([(image.ravel(), sigma_intensity)] if sigma_intensity else []):
        d = f.astype(np.float64)[:, None] - f.astype(np.float64)[None, :]
        e += d * d / (2 * scale**2)
    k = np.exp(-e)
    v = values.reshape(values.shape[0], -1).astype(np.float64)
    return ((k @ v.T) / k.sum(1, keepdims=True)).T.reshape(values.shape)


def _small_scene():
    """A (10, 18, 18) image: a bright ball in a darker band, noise, two far outliers; and
    three value channels like a CRF's: the ball's indicator, a half-space, random values."""
    rng = np.random.default_rng(3)
    shape = (10, 18, 18)
    zz, yy, xx = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, SPACING)], indexing="ij")
    ball = ((zz - 10) ** 2 + (yy - 7) ** 2 + (xx - 8) ** 2 < 30).astype(np.float32)
    image = (ball + 0.4 * (xx > 8) + rng.normal(0, 0.15, shape)).astype(np.float32)
    image[0, 0, :4] = 30.0  # outliers far from everything (air / metal): gap closing
    image[-1, -1, :2] = -40.0
    values = np.stack([ball, (yy > 7).astype(np.float32), rng.random(shape, dtype=np.float32)])
    return image, values


@pytest.fixture(scope="module")
def small_scene():
    return _small_scene()


# Tolerance: the grid samples space and intensity every 0.5 sigma with linear splat/slice.
# On these 0/1 and random channels that leaves a mean error of ~0.0015-0.0022 and a largest
# of ~0.015-0.032 (at isolated voxels whose normaliser is small) (measured). Widening both
# sigmas by 25 % moves the exact result by 0.17-0.20 at most and 0.016-0.035 on average
# (checked below), so these bounds tell a correct kernel from a wrong one.
MAX_ERR, MEAN_ERR = 0.05, 0.005


@pytest.mark.parametrize("sigma_mm, sigma_i", [(3.0, 0.5), (5.0, 0.3), (2.0, 0.25)])
def test_bilateral_filter_matches_brute_force(small_scene, sigma_mm, sigma_i):
    image, values = small_scene
    ref = brute_force(values, image, SPACING, sigma_mm, sigma_i)
    out = bilateral_filter(values, image, SPACING, sigma_mm, sigma_i)
    assert out.shape == values.shape and out.dtype == np.float32
    err = np.abs(out - ref)
    assert err.max() < MAX_ERR, err.max()
    assert err.mean() < MEAN_ERR, err.mean()
    wrong = brute_force(values, image, SPACING, 1.25 * sigma_mm, 1.25 * sigma_i)
    assert np.abs(wrong - ref).max() > 2 * MAX_ERR and np.abs(wrong - ref).mean() > 2 * MEAN_ERR
    np.testing.assert_allclose(bilateral_filter(np.ones_like(image), image, SPACING, sigma_mm, sigma_i), 1.0, atol=1e-5)


def test_far_outliers_do_not_grow_the_grid(small_scene):
    image, _ = small_scene
    clean = np.clip(image, -2, 3)
    assert build_grid(image, SPACING, 3.0, 0.5).grid_shape[3] < 2 * build_grid(clean, SPACING, 3.0, 0.5).grid_shape[3]


@pytest.mark.parametrize("sigma_mm", [1.5, 4.0])
def test_gaussian_filter_matches_brute_force(small_scene, sigma_mm):
    image, values = small_scene
    ref = brute_force(values, image, SPACING, sigma_mm)
    out = gaussian_filter_mm(values, SPACING, sigma_mm)
    np.testing.assert_allclose(out, ref, atol=2e-3)  # the kernel is cut at 3 sigma (weight 0.011)
    np.testing.assert_allclose(gaussian_filter_mm(values[0], SPACING, sigma_mm), out[0])


def _synthetic_case(seed: int = 0, shape=(20, 48, 48), spacing=(2.0, 1.0, 1.0)):
    """Truth: a liver ball with a hypodense tumour; image: class intensities + noise;
    probabilities: softmax(2 * one-hot + noise), noise mildly smoothed (blobby errors)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    c = [n * s / 2 for n, s in zip(shape, spacing)]
    truth = np.zeros(shape, np.uint8)
    truth[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < 18**2] = 1
    truth[(zz - c[0]) ** 2 + (yy - c[1] - 6) ** 2 + (xx - c[2]) ** 2 < 7**2] = 2
    image = (np.choose(truth, [-1.0, 0.6, -0.4]) + rng.normal(0, 0.25, shape)).astype(np.float32)
    noise = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), 0.7) for _ in range(3)])
    logits = 2.0 * np.eye(3)[truth].transpose(3, 0, 1, 2) + 1.2 * noise / noise.std()
    p = np.exp(logits - logits.max(0))
    return (p / p.sum(0)).astype(np.float32), image, truth, spacing


@pytest.fixture(scope="module")
def case():
    return _synthetic_case()


def test_crf_raises_dice(case):
    probs, image, truth, spacing = case
    before = case_dice(probs.argmax(0), truth)
    after = case_dice(dense_crf(probs, image, spacing).argmax(0), truth)
    assert before["liver"] < 0.9 and before["tumour"] < 0.6  # the case is really noisy
    assert after["liver"] > before["liver"] + 0.05
    assert after["tumour"] > before["tumour"] + 0.1


def test_output_is_a_probability_map(case):
    probs, image, _, spacing = case
    out = dense_crf(probs.astype(np.float16), image, spacing, n_iterations=3)
    assert out.shape == probs.shape and out.dtype == np.float32
    assert (out >= 0).all() and np.isfinite(out).all()
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-5)


def test_zero_weights_or_iterations_return_the_input(case):
    probs, image, _, spacing = case
    np.testing.assert_allclose(dense_crf(probs, image, spacing, spatial_weight=0, bilateral_weight=0), probs, atol=1e-5)
    np.testing.assert_allclose(dense_crf(probs, image, spacing, n_iterations=0), probs, atol=1e-6)


def test_label_symmetry(case):
    probs, image, _, spacing = case
    perm = [2, 0, 1]
    out = dense_crf(probs, image, spacing, roi=None, n_iterations=3)
    out_perm = dense_crf(probs[perm], image, spacing, roi=None, n_iterations=3)
    np.testing.assert_allclose(out_perm, out[perm], atol=2e-5)
    # swapping liver and tumour keeps the liver box (argmax >= 1), so roi="liver" commutes too
    swap = [0, 2, 1]
    np.testing.assert_allclose(dense_crf(probs[swap], image, spacing, n_iterations=3),
                               dense_crf(probs, image, spacing, n_iterations=3)[swap], atol=2e-5)


def test_outside_the_liver_box_is_untouched():
    probs, image, truth, spacing = _synthetic_case(1)
    pad = ((0, 0), (0, 6), (10, 0), (0, 25))
    big = np.pad(probs, pad, constant_values=0.5)  # unnormalised 0.5 / 0.5 / 0.5 far away
    big[0, :, :10] = 0.9  # background-dominant strip beyond the margin
    img = np.pad(image, pad[1:], constant_values=-1.0)
    margin = 3.0
    box = liver_box(big, spacing, margin)
    fg = big[1:].max(0) > big[0]
    idx = np.argwhere(fg)
    grow = [int(np.ceil(margin / s)) for s in spacing]
    assert box == tuple(slice(max(0, lo - g), min(n, hi + 1 + g)) for lo, hi, g, n in zip(idx.min(0), idx.max(0), grow, fg.shape))
    out = dense_crf(big, img, spacing, margin_mm=margin)
    inside = np.zeros(fg.shape, bool)
    inside[box] = True
    np.testing.assert_array_equal(out[:, ~inside], big[:, ~inside])
    assert not np.allclose(out[:, inside], big[:, inside])
    np.testing.assert_allclose(out[:, inside].sum(0), 1.0, atol=1e-5)


def test_no_liver_returns_input_unchanged(case):
    _, image, _, spacing = case
    probs = np.zeros((3,) + image.shape, np.float32)
    probs[0] = 0.8
    probs[1:] = 0.1
    out = dense_crf(probs, image, spacing)
    np.testing.assert_array_equal(out, probs)
    assert liver_box(probs, spacing, 5.0) is None


@pytest.mark.parametrize("kwargs, match", [
    ({"image": np.zeros((4, 5, 6), np.float32)}, "does not match"),
    ({"bilateral_sigma_mm": -1.0}, "bilateral_sigma_mm"),
    ({"spatial_sigma_mm": 0.0}, "spatial_sigma_mm"),
    ({"bilateral_sigma_intensity": float("nan")}, "bilateral_sigma_intensity"),
    ({"bilateral_weight": -2.0}, "bilateral_weight"),
    ({"margin_mm": -1.0}, "margin_mm"),
    ({"n_iterations": 1.5}, "n_iterations"),
    ({"roi": "body"}, "roi"),
    ({"spacing": (1.0, 0.0, 1.0)}, "spacing"),
    ({"probabilities": np.zeros((5, 6, 7), np.float32)}, "C, Z, Y, X"),
    ({"probabilities": -np.ones((2, 5, 6, 7), np.float32)}, "non-negative"),
])
def test_bad_arguments(kwargs, match):
    args = {"probabilities": np.full((2, 5, 6, 7), 0.5, np.float32), "image": np.zeros((5, 6, 7), np.float32),
            "spacing": (1.0, 1.0, 1.0)}
    args.update({k: kwargs.pop(k) for k in list(kwargs) if k in args})
    with pytest.raises(ValueError, match=match):
        dense_crf(args["probabilities"], args["image"], args["spacing"], **kwargs)


def test_filter_bad_arguments():
    image = np.zeros((4, 5, 6), np.float32)
    with pytest.raises(ValueError, match="does not match"):
        bilateral_filter(np.zeros((2, 4, 5, 7), np.float32), image, SPACING, 3.0, 0.5)
    with pytest.raises(ValueError, match="intensity sigma"):
        bilateral_filter(image, image, SPACING, 3.0, -0.5)
    with pytest.raises(ValueError, match="spatial sigma"):
        gaussian_filter_mm(image, SPACING, -3.0)


def test_param_grid_is_valid(case):
    probs, image, _, spacing = case
    assert 3 <= len(CRF_PARAM_GRID) <= 6
    defaults = {k: v.default for k, v in inspect.signature(dense_crf).parameters.items() if k in CRF_PARAM_GRID[2]}
    assert defaults == CRF_PARAM_GRID[2]
    for params in CRF_PARAM_GRID:
        out = dense_crf(probs, image, spacing, n_iterations=1, **params)
        np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-5)
