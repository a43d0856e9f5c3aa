"""LiTS-style lesion detection on constructed lesion sets: exact, missed, false-positive, split,
merged and poorly overlapping lesions; the in-plane joining of reference pieces; pooling."""

import math

import numpy as np
import pytest

from autoliver.evaluate import DetectionResult, detect_lesions, detection_summary, label_lesions, match_lesions

SHAPE = (12, 40, 40)


def box(mask, z, y, x):
    """Set mask[z0:z1, y0:y1, x0:x1]; returns the mask for chaining."""
    mask[z[0]:z[1], y[0]:y[1], x[0]:x[1]] = True
    return mask


def empty():
    return np.zeros(SHAPE, bool)


def counts(result: DetectionResult):
    return {name: result.counts(t) for name, t in (("overlap", 0.0), ("iou50", 0.5))}


def test_exact_lesions_are_all_detected():
    ref = box(box(empty(), (1, 4), (2, 8), (2, 8)), (6, 10), (20, 30), (20, 30))
    r = detect_lesions(ref.copy(), ref)
    assert (r.n_ref, r.n_pred) == (2, 2)
    assert counts(r) == {"overlap": (2, 0, 0), "iou50": (2, 0, 0)}
    assert all(m.iou == 1.0 for m in r.matches)


def test_missed_and_false_positive_lesions():
    ref = box(box(empty(), (1, 4), (2, 8), (2, 8)), (6, 10), (20, 30), (20, 30))
    pred = box(box(empty(), (1, 4), (2, 8), (2, 8)), (6, 9), (2, 6), (30, 36))  # 2nd: nowhere near a tumour
    r = detect_lesions(pred, ref)
    assert counts(r) == {"overlap": (1, 1, 1), "iou50": (1, 1, 1)}
    assert detect_lesions(empty(), ref).counts(0.0) == (0, 0, 2)
    assert detect_lesions(pred, empty()).counts(0.0) == (0, 2, 0)
    assert detect_lesions(empty(), empty()).counts(0.5) == (0, 0, 0)


def test_split_lesion_is_one_detection():
    ref = box(empty(), (2, 8), (10, 20), (10, 30))
    pred = ref.copy()
    pred[:, :, 20] = False  # cut in two pieces
    r = detect_lesions(pred, ref)
    assert (r.n_ref, r.n_pred, r.split, r.merged) == (1, 2, 1, 0)
    assert counts(r) == {"overlap": (1, 0, 0), "iou50": (1, 0, 0)}
    (m,) = r.matches
    assert m.pred_lesions == (1, 2) and m.intersection == np.count_nonzero(pred)
    assert m.iou == pytest.approx(np.count_nonzero(pred) / np.count_nonzero(ref))


@pytest.mark.parametrize("bridge, detected_at_iou50", [(4, True), (30, False)])
def test_merged_lesions_count_each_reference_lesion(bridge, detected_at_iou50):
    # two tumours 4 voxels apart in-plane; one prediction covers both (plus a bridge, or plus a lot)
    ref = box(box(empty(), (3, 7), (10, 18), (5, 13)), (3, 7), (10, 18), (17, 25))
    pred = box(ref.copy(), (3, 7), (10, 18), (13, 17))
    if bridge > 4:
        pred = box(pred, (0, 12), (0, 40), (0, 26))
    r = detect_lesions(pred, ref)
    assert (r.n_ref, r.n_pred, r.merged, r.split) == (2, 1, 1, 0)
    (m,) = r.matches
    assert m.ref_lesions == (1, 2)
    assert m.iou == pytest.approx(np.count_nonzero(ref) / np.count_nonzero(pred))
    assert r.counts(0.0) == (2, 0, 0)
    assert r.counts(0.5) == ((2, 0, 0) if detected_at_iou50 else (0, 1, 2))


def test_poor_overlap_detected_at_overlap_only():
    ref = box(empty(), (2, 6), (10, 20), (10, 20))
    pred = box(empty(), (2, 6), (10, 20), (17, 27))  # 3 of 10 columns shared: IoU 30/170
    r = detect_lesions(pred, ref)
    assert r.matches[0].iou == pytest.approx(3 / 17)
    assert counts(r) == {"overlap": (1, 0, 0), "iou50": (0, 1, 1)}


def test_reference_pieces_touching_in_plane_are_one_lesion():
    ref = box(box(empty(), (4, 6), (10, 14), (10, 14)), (4, 6), (14, 18), (14, 18))  # corners touch in-plane
    ref2 = box(box(empty(), (4, 6), (10, 14), (10, 14)), (4, 6), (10, 14), (15, 19))  # one empty column between
    for mask in (ref, ref2):
        assert label_lesions(mask)[1] == 2
        assert label_lesions(mask, join_inplane=True)[1] == 1
        labels, _ = label_lesions(mask, join_inplane=True)
        assert np.array_equal(labels > 0, mask)  # the dilation is trimmed away
        r = detect_lesions(mask, mask)  # 1 reference lesion, found as 2 predicted pieces: a split, no FP
        assert (r.n_ref, r.n_pred, r.split, r.counts(0.5)) == (1, 2, 1, (1, 0, 0))
        assert detect_lesions(mask, mask, join_reference_inplane=False).counts(0.5) == (2, 0, 0)
    near = box(box(empty(), (4, 6), (10, 14), (10, 14)), (4, 6), (10, 14), (16, 20))  # two columns apart: joined
    assert label_lesions(near, join_inplane=True)[1] == 1
    far = box(box(empty(), (4, 6), (10, 14), (10, 14)), (4, 6), (10, 14), (17, 21))  # three columns apart
    assert label_lesions(far, join_inplane=True)[1] == 2
    above = box(box(empty(), (2, 4), (10, 14), (10, 14)), (5, 7), (10, 14), (10, 14))  # one slice apart: not joined
    assert label_lesions(above, join_inplane=True)[1] == 2


def test_prediction_owned_by_its_largest_overlap():
    # one predicted lesion overlaps reference A a lot and reference B a little; B is best covered by
    # a second prediction: no merge, two matches
    ref = box(box(empty(), (2, 6), (5, 15), (5, 15)), (2, 6), (5, 15), (20, 30))
    p1 = box(empty(), (2, 6), (5, 15), (5, 21))  # A whole + 1 column of B
    p2 = box(empty(), (2, 6), (5, 15), (23, 30))
    r = detect_lesions(p1 | p2, ref)
    assert r.merged == 0 and r.split == 0 and len(r.matches) == 2
    assert r.counts(0.5) == (2, 0, 0)


def test_result_does_not_depend_on_label_order():
    rng = np.random.default_rng(0)
    ref, pred = empty(), empty()
    for _ in range(6):
        z, y, x = rng.integers(0, 10), rng.integers(0, 34), rng.integers(0, 34)
        box(ref, (z, z + 2), (y, y + 5), (x, x + 5))
        dz, dy, dx = rng.integers(-1, 2, 3)
        box(pred, (max(0, z + dz), z + dz + 2), (max(0, y + dy), y + dy + 5), (max(0, x + dx), x + dx + 5))
    a = detect_lesions(pred, ref)
    b = detect_lesions(pred[::-1, ::-1, ::-1], ref[::-1, ::-1, ::-1])
    assert (a.n_ref, a.n_pred) == (b.n_ref, b.n_pred)
    assert a.counts(0.0) == b.counts(0.0) and a.counts(0.5) == b.counts(0.5)
    assert sorted(round(m.iou, 9) for m in a.matches) == sorted(round(m.iou, 9) for m in b.matches)


def test_match_lesions_checks_shapes_and_summary_pools_cases():
    with pytest.raises(ValueError):
        match_lesions(np.zeros((2, 2, 2), np.int32), 0, np.zeros((2, 2, 3), np.int32), 0)
    cases = [
        {"tp_overlap": 2, "fp_overlap": 1, "fn_overlap": 0, "tp_iou50": 1, "fp_iou50": 2, "fn_iou50": 1},
        {"tp_overlap": 1, "fp_overlap": 0, "fn_overlap": 3, "tp_iou50": 0, "fp_iou50": 1, "fn_iou50": 4},
    ]
    s = detection_summary(cases)
    assert s["overlap"]["precision"] == pytest.approx(3 / 4) and s["overlap"]["recall"] == pytest.approx(3 / 6)
    assert s["iou50"]["precision"] == pytest.approx(1 / 4) and s["iou50"]["recall"] == pytest.approx(1 / 6)
    none = detection_summary([detect_lesions(empty(), empty())])
    assert math.isnan(none["overlap"]["precision"]) and math.isnan(none["iou50"]["recall"])


def test_lesions_on_both_sides_that_never_touch_are_all_unmatched():
    pred = np.zeros((6, 12, 12), bool)
    ref = np.zeros((6, 12, 12), bool)
    pred[1:3, 1:3, 1:3] = True
    ref[3:5, 8:10, 8:10] = True
    result = detect_lesions(pred, ref).to_json()
    assert result["n_pred"] == 1 and result["n_ref"] == 1
    assert result["tp_overlap"] == 0 and result["fp_overlap"] == 1 and result["fn_overlap"] == 1
