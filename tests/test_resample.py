"""Resampling: images against scipy.ndimage, labels against invariants and a linear reference."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from autoliver.preprocess import resample as R


def smooth_volume(shape, seed=0):
    z, y, x = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(1.0, 2.0, 3)
    return (np.sin(2 * np.pi * a * z) * np.cos(2 * np.pi * b * y) + np.sin(2 * np.pi * c * x + 0.3)).astype(np.float32)


def zoom_to(volume, shape, order):
    factors = [o / i for o, i in zip(shape, volume.shape)]
    return ndimage.zoom(volume.astype(np.float64), factors, order=order, grid_mode=True, mode="nearest")


@pytest.mark.parametrize("out_shape", [(52, 37, 81), (20, 64, 45)])
def test_image_matches_scipy_cubic_on_smooth_data(out_shape):
    vol = smooth_volume((40, 50, 60))
    ours = R.resample_to_shape(vol, out_shape, 3, 3)
    ref = zoom_to(vol, out_shape, 3)
    assert ours.shape == out_shape and ours.dtype == np.float32
    inner = (slice(3, -3),) * 3
    diff = ours[inner] - ref[inner]
    assert np.sqrt(np.mean(diff**2)) < 1e-2  # Keys cubic vs cubic B-spline
    assert np.abs(diff).max() < 3e-2


def test_linear_z_matches_scipy_linear():
    vol = smooth_volume((30, 20, 20), seed=1)
    out_shape = (71, 20, 20)  # z only: in-plane untouched, so only the z pass acts
    ours = R.resample_to_shape(vol, out_shape, 3, 1)
    ref = zoom_to(vol, out_shape, 1)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_chunking_does_not_change_the_result(monkeypatch):
    vol = smooth_volume((33, 40, 30), seed=2)
    seg = (vol > 0.5).astype(np.uint8) + (vol > 1.2)
    whole = R.resample_to_shape(vol, (50, 31, 47)), R.resample_labels(seg, (50, 31, 47))
    monkeypatch.setattr(R, "CHUNK_VOXELS", 31 * 47 * 3)  # 3 output slices per chunk
    assert R.chunk_count((50, 31, 47)) == 17
    chunked = R.resample_to_shape(vol, (50, 31, 47)), R.resample_labels(seg, (50, 31, 47))
    np.testing.assert_array_equal(whole[0], chunked[0])
    np.testing.assert_array_equal(whole[1], chunked[1])


@pytest.mark.parametrize("order", [0, 1, 3])
def test_axis_weights_sum_to_one_and_stay_in_range(order):
    for n_in, n_out in [(10, 23), (23, 10), (7, 7), (1, 5), (5, 1)]:
        idx, w = R.axis_weights(n_in, n_out, order)
        np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
        assert idx.min() >= 0 and idx.max() < n_in


def test_constant_and_identity():
    vol = np.full((9, 8, 7), 3.5, dtype=np.float32)
    np.testing.assert_allclose(R.resample_to_shape(vol, (13, 5, 11)), 3.5, atol=1e-5)
    img = smooth_volume((9, 8, 7))
    np.testing.assert_array_equal(R.resample_image(img, (1, 1, 1), (1, 1, 1)), img)


def test_new_shape_and_anisotropy():
    assert R.new_shape_for((78, 512, 512), (2.0, 0.727, 0.727), (1.0, 1.0, 1.0)) == (156, 372, 372)
    assert R.is_anisotropic((5.0, 0.8, 0.8)) and not R.is_anisotropic((2.0, 0.8, 0.8), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError):
        R.new_shape_for((3, 3, 3), (1, 0, 1), (1, 1, 1))


def blobs(shape, seed=0):
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), 3)
    seg = np.zeros(shape, np.uint8)
    seg[field > 0.02] = 1
    seg[field > 0.06] = 2
    return seg


@pytest.mark.parametrize("out_shape", [(30, 20, 25), (64, 90, 71), (41, 12, 80)])
def test_labels_shapes_exact_and_no_new_values(out_shape):
    seg = blobs((40, 45, 50))
    seg[seg == 1] = 4  # labels {0, 2, 4}: nothing in between may appear
    out = R.resample_labels(seg, out_shape)
    assert out.shape == out_shape and out.dtype == seg.dtype
    assert set(np.unique(out)) <= set(np.unique(seg))


@pytest.mark.parametrize("out_shape", [(20, 18, 22), (14, 14, 14), (11, 13, 12), (30, 25, 21)])
def test_single_voxel_tumour_survives_upsampling(out_shape):
    seg = np.zeros((10, 9, 11), np.uint8)
    seg[2:8, 2:7, 2:9] = 1
    seg[5, 4, 5] = 2
    out = R.resample_labels(seg, out_shape)
    assert (out == 2).sum() >= 1
    # and it sits where the voxel was: its centre maps inside the tumour voxel's footprint
    z, y, x = np.argwhere(out == 2).mean(axis=0)
    for c, pos, n_in, n_out in zip((z, y, x), (5, 4, 5), seg.shape, out_shape):
        assert abs((c + 0.5) * n_in / n_out - 0.5 - pos) <= 0.5


def test_labels_agree_with_linear_one_hot_reference():
    """Away from rescued voxels the result is argmax of linearly interpolated one-hot maps."""
    seg = blobs((30, 40, 40), seed=3)
    out_shape = (45, 31, 52)
    ours = R.resample_labels(seg, out_shape, rescue=False)
    probs = np.stack([zoom_to((seg == c).astype(np.float32), out_shape, 1) for c in (0, 1, 2)])
    ref = np.argmax(probs[::-1], axis=0)  # reversed: ties go to the higher label
    ref = 2 - ref
    assert np.mean(ours == ref) > 0.999
    rescued = R.resample_labels(seg, out_shape)
    assert np.mean(rescued == ours) > 0.99


def test_labels_with_only_background():
    seg = np.zeros((5, 6, 7), np.uint8)
    out = R.resample_labels(seg, (9, 3, 4))
    assert out.shape == (9, 3, 4) and not out.any()


def test_probabilities_stay_a_distribution():
    seg = blobs((20, 24, 22), seed=4)
    probs = np.stack([(seg == c).astype(np.float32) for c in (0, 1, 2)])
    out = R.resample_probabilities(probs, (31, 17, 40))
    assert out.shape == (3, 31, 17, 40)
    np.testing.assert_allclose(out.sum(axis=0), 1.0, atol=1e-5)
    assert out.min() >= -1e-6 and out.max() <= 1 + 1e-6


def test_bad_arguments():
    with pytest.raises(ValueError):
        R.resample_to_shape(np.zeros((4, 4)), (2, 2, 2))
    with pytest.raises(ValueError):
        R.resample_labels(np.zeros((4, 4, 4), np.float32), (2, 2, 2))
    with pytest.raises(ValueError):
        R.axis_weights(4, 5, 2)


@pytest.mark.parametrize("case", ["chaos_ct_sample", "dcmqi_ct3slice"])
@pytest.mark.parametrize("target", [(3.0, 3.0, 3.0), (1.0, 0.8, 0.8)])
def test_normalisation_fused_into_resampling_is_bit_for_bit_the_two_step_result(case, target):
    """Real CT (int16 HU): normalising the slices as they are read equals normalising the whole
    crop and resampling it, to the bit, so stored training data do not change."""
    from autoliver import examples
    from autoliver.io.images import read_image
    from autoliver.preprocess.case import crop_to_body, resample_cropped, resample_normalised
    from autoliver.preprocess.normalise import normalise_ct
    from planning.plans import Normalisation

    norm = Normalisation("ct", -100.0, 250.0, 80.0, 60.0)
    image, geometry = read_image(examples.image_path(case))
    assert image.dtype == np.int16
    hu, _, _ = crop_to_body(image, None)
    expected, _ = resample_cropped(normalise_ct(hu, norm), None, geometry.spacing, target)
    got, _ = resample_normalised(hu, None, geometry.spacing, target, norm)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert np.array_equal(got, expected)
