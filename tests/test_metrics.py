"""Overlap and surface metrics against hand-computed cases and an independent brute force
(surface voxels found by explicit neighbour tests, distances by a k-d tree in mm)."""

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from autoliver.evaluate import (
    OverlapCounts,
    accuracy,
    assd,
    bounding_box,
    dice,
    f1,
    hd95,
    iou,
    mssd,
    overlap_counts,
    overlap_metrics,
    precision,
    recall,
    rvd,
    surface,
    surface_distances,
    surface_metrics,
    voe,
)


def test_overlap_metrics_hand_computed():
    c = OverlapCounts(tp=2, fp=1, fn=3, tn=4)
    assert dice(c) == pytest.approx(4 / 8)
    assert iou(c) == pytest.approx(2 / 6)
    assert voe(c) == pytest.approx(4 / 6)
    assert rvd(c) == pytest.approx((3 - 5) / 5)  # prediction smaller: negative
    assert precision(c) == pytest.approx(2 / 3)
    assert recall(c) == pytest.approx(2 / 5)
    assert f1(c) == pytest.approx(dice(c))  # voxel F1 is Dice
    assert accuracy(c) == pytest.approx(6 / 10)


def test_overlap_counts_from_masks_and_crop_total():
    pred = np.zeros((2, 3, 4), bool)
    ref = np.zeros_like(pred)
    pred[0, 0, :3] = True  # 3 voxels
    ref[0, 0, 1:] = True  # 3 voxels, 2 shared
    ref[1, 2, 3] = True
    c = overlap_counts(pred, ref)
    assert c == OverlapCounts(tp=2, fp=1, fn=2, tn=24 - 5)
    assert overlap_counts(pred, ref, total=1000).tn == 1000 - 5
    with pytest.raises(ValueError):
        overlap_counts(pred, ref, total=3)
    with pytest.raises(ValueError):
        overlap_counts(pred, ref[:1])


def test_lits_empty_rules():
    both_empty = OverlapCounts(0, 0, 0, 10)
    m = overlap_metrics(both_empty)
    assert m["dice"] == m["iou"] == m["precision"] == m["recall"] == m["f1"] == m["accuracy"] == 1.0
    assert m["voe"] == 0.0 and math.isnan(m["rvd"])
    missed = OverlapCounts(0, 0, 5, 5)  # prediction empty, reference not
    assert dice(missed) == 0.0 and recall(missed) == 0.0 and precision(missed) == 0.0 and rvd(missed) == -1.0
    spurious = OverlapCounts(0, 4, 0, 6)  # reference empty, prediction not
    assert dice(spurious) == 0.0 and precision(spurious) == 0.0 and math.isnan(rvd(spurious))
    empty = np.zeros((3, 3, 3), bool)
    blob = empty.copy()
    blob[1, 1, 1] = True
    for a, b in ((empty, empty), (blob, empty), (empty, blob)):
        assert all(math.isnan(v) for v in surface_metrics(a, b, (1, 1, 1)).values())
    assert surface_distances(blob, empty, (1, 1, 1)) is None


def test_surface_distances_hand_computed():
    ref = np.zeros((5, 4, 6), bool)
    pred = np.zeros_like(ref)
    ref[0, 0, 0] = True
    pred[3, 0, 4] = True  # 3 slices of 2 mm and 4 columns of 0.5 mm away
    d = surface_distances(pred, ref, (2.0, 1.0, 0.5))
    expected = math.hypot(6.0, 2.0)
    assert d.pred_to_ref.tolist() == pytest.approx([expected])
    assert assd(d) == mssd(d) == hd95(d) == pytest.approx(expected)
    # a 3x3x3 cube has 26 surface voxels (all but its centre); identical masks: all zero
    cube = np.zeros((7, 7, 7), bool)
    cube[2:5, 2:5, 2:5] = True
    assert np.count_nonzero(surface(cube)) == 26
    assert surface_metrics(cube, cube, (3.0, 1.0, 1.0)) == {"assd_mm": 0.0, "mssd_mm": 0.0, "hd95_mm": 0.0}
    # the cube grown by one voxel along x (spacing 0.5 mm): every surface distance is 0 or 0.5
    wide = cube.copy()
    wide[2:5, 2:5, 5] = True
    d = surface_distances(wide, cube, (3.0, 1.0, 0.5))
    assert set(np.round(d.pooled, 6)) == {0.0, 0.5}
    assert mssd(d) == 0.5


def _surface_brute(mask: np.ndarray) -> np.ndarray:
    """Surface voxels by testing the six face neighbours explicitly (outside the volume = outside)."""
    padded = np.pad(mask, 1)
    inner = np.ones_like(mask)
    for axis in range(3):
        for shift in (-1, 1):
            inner &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
    return mask & ~inner


def _brute_distances(pred, ref, spacing):
    p = np.argwhere(_surface_brute(pred)) * np.asarray(spacing)
    r = np.argwhere(_surface_brute(ref)) * np.asarray(spacing)
    return cKDTree(r).query(p)[0], cKDTree(p).query(r)[0]


def _blob(rng, shape, sigma, threshold):
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field > threshold * field.std()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_surface_metrics_match_kdtree_brute_force(seed):
    rng = np.random.default_rng(seed)
    shape = (18, 30, 26)
    spacing = tuple(rng.uniform(0.4, 3.0, 3))
    ref = _blob(rng, shape, 2.5, 0.6)
    pred = _blob(rng, shape, 2.5, 0.6) | (ref & (rng.random(shape) < 0.7))
    if seed == 3:  # masks touching the volume's edges
        ref[0], pred[:, :, -1] = True, True
    assert ref.any() and pred.any()
    p2r, r2p = _brute_distances(pred, ref, spacing)
    d = surface_distances(pred, ref, spacing)
    np.testing.assert_allclose(np.sort(d.pred_to_ref), np.sort(p2r), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.sort(d.ref_to_pred), np.sort(r2p), rtol=1e-9, atol=1e-9)
    pooled = np.concatenate([p2r, r2p])
    m = surface_metrics(pred, ref, spacing)
    assert m["assd_mm"] == pytest.approx(pooled.mean())
    assert m["mssd_mm"] == pytest.approx(pooled.max())
    assert m["hd95_mm"] == pytest.approx(np.percentile(pooled, 95))
    assert surface_metrics(ref, pred, spacing) == pytest.approx(m)  # symmetric


def test_surface_metrics_do_not_depend_on_the_empty_margin():
    rng = np.random.default_rng(5)
    ref = _blob(rng, (12, 14, 16), 2.0, 0.5)
    pred = np.roll(ref, 2, axis=2)
    spacing = (2.5, 0.7, 0.9)
    small = surface_metrics(pred, ref, spacing)
    big_ref, big_pred = (np.pad(a, ((3, 40), (0, 25), (17, 2))) for a in (ref, pred))
    assert surface_metrics(big_pred, big_ref, spacing) == pytest.approx(small)


def test_bounding_box():
    m = np.zeros((4, 5, 6), bool)
    assert bounding_box(m) is None
    m[1, 2, 3] = m[2, 4, 0] = True
    assert bounding_box(m) == (slice(1, 3), slice(2, 5), slice(0, 4))
    assert bounding_box(m, margin=1) == (slice(0, 4), slice(1, 5), slice(0, 5))
    with pytest.raises(ValueError):
        surface_metrics(m, m, (1.0, 0.0, 1.0))
