"""Two-stage inference: the tumour stage runs only in the liver stage's box and adds tumour
only inside the liver stage's liver.

The tumour stage's image stores each voxel's linear index as its value, so a spy predictor
knows exactly which voxels every input it gets comes from; it calls tumour wherever the
synthetic truth ``TUMOUR_TRUTH`` has it (also a little outside the liver)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoliver.infer.two_stage import (
    liver_labels_in_grid,
    liver_roi_box,
    stage_context,
    stage_min_size,
    two_stage_predict,
    window_predictor,
)
from planning.plans import Configuration

SHAPE = (12, 32, 32)
SPACING = (2.0, 1.0, 1.0)
MARGIN = 4.0  # mm: 2 voxels in z, 4 in plane
PAD = -1.0
LIVER_BOX = ((2, 8), (8, 20), (10, 24))  # even faces: a half-resolution grid holds it exactly
BOX = ((0, 10), (4, 24), (6, 28))  # LIVER_BOX + the margin


def liver_stage() -> np.ndarray:
    seg = np.zeros(SHAPE, np.uint8)
    seg[tuple(slice(a, b) for a, b in LIVER_BOX)] = 1
    seg[4:6, 10:12, 12:14] = 2  # a tumour the liver stage called, which the tumour stage does not
    return seg


def tumour_truth() -> np.ndarray:
    t = np.zeros(SHAPE, bool)
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    t |= (z - 6) ** 2 + (y - 15) ** 2 + (x - 19) ** 2 <= 4  # inside the liver, missed by the liver stage
    t[4:6, 17:23, 14:17] = True  # straddles the liver's edge (y 20-22 lie outside it)
    return t


TUMOUR_TRUTH = tumour_truth()
IMAGE = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)


def config(kind: str) -> Configuration:
    dims = 3 if kind == "3d" else 2
    patch = (4, 8, 8) if dims == 3 else (8, 8)
    k = ((3,) * dims,) * 2
    return Configuration(name=kind, network_dims=dims, data_identifier="fullres", spacing=SPACING, median_shape=SHAPE,
                         patch_size=patch, batch_size=2, n_stages=2, features_per_stage=(4, 8), kernel_sizes=k,
                         strides=((1,) * dims, (2,) * dims), in_slices=3 if kind == "2.5d" else 1)


class SpyTiles:
    """A tile predictor (B, C, *patch) -> logits that records every voxel it is shown."""

    def __init__(self):
        self.seen = np.zeros(SHAPE, bool)
        self.calls = 0
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.shapes.append(tuple(x.shape))
        v = x.numpy()
        real = v[v >= 0].astype(np.int64)
        self.seen[np.unravel_index(real, SHAPE)] = True
        centre = v[:, v.shape[1] // 2]  # 2.5d: the centre slice of the stack
        idx = np.clip(centre, 0, None).astype(np.int64)
        tumour = TUMOUR_TRUTH.reshape(-1)[idx] & (centre >= 0)
        logits = np.zeros((v.shape[0], 3, *v.shape[2:]), np.float32)
        logits[:, 1] = 1.0
        logits[:, 2] = np.where(tumour, 5.0, -5.0)
        return torch.from_numpy(logits)


def inside_box(box) -> np.ndarray:
    m = np.zeros(SHAPE, bool)
    m[tuple(slice(a, b) for a, b in box)] = True
    return m


@pytest.mark.parametrize("kind", ["3d", "2d", "2.5d"])
def test_tumour_stage_sees_and_writes_only_inside_the_liver_box(kind):
    c = config(kind)
    liver = liver_stage()
    spy = SpyTiles()
    context = stage_context(c)
    res = two_stage_predict(liver, IMAGE, window_predictor(spy, c, 3, pad_value=PAD), SPACING, MARGIN, context=context)
    assert res.box == BOX and res.liver_found
    # every input voxel comes from the box (2.5d: plus the neighbouring slices it stacks)
    seen_region = tuple((max(0, a - k), min(n, b + k)) for (a, b), k, n in zip(BOX, context, SHAPE))
    assert spy.calls > 0 and not spy.seen[~inside_box(seen_region)].any()
    assert spy.seen[inside_box(BOX)].all()
    assert all(s[2:] == tuple(c.patch_size) for s in spy.shapes)
    # outside the box: the liver stage's labels with its tumour removed (no liver there: background)
    expected_outside = np.where(liver == 2, 1, liver)
    out = ~inside_box(BOX)
    np.testing.assert_array_equal(res.labels[out], expected_outside[out])
    # tumour only inside the liver stage's liver, exactly where the tumour stage found it
    mask = liver > 0
    np.testing.assert_array_equal(res.labels == 2, mask & TUMOUR_TRUTH)
    np.testing.assert_array_equal(res.labels[mask & ~TUMOUR_TRUTH], 1)
    np.testing.assert_array_equal(res.labels[~mask], liver[~mask])
    assert (TUMOUR_TRUTH & ~mask).any()  # the stage did call tumour outside the liver: cut away
    # the probabilities are the tumour stage's over the box
    shape = tuple(b - a for a, b in BOX)
    assert res.probabilities.shape == (3, *shape) and res.probabilities.dtype == torch.float32
    np.testing.assert_array_equal(res.probabilities.argmax(0).numpy() == 2, TUMOUR_TRUTH[inside_box(BOX)].reshape(shape))
    torch.testing.assert_close(res.probabilities.sum(0), torch.ones(shape))


def test_stage_two_finds_a_tumour_stage_one_missed():
    liver = liver_stage()
    assert (liver[6, 15, 19] == 1) and TUMOUR_TRUTH[6, 15, 19]
    res = two_stage_predict(liver, IMAGE, window_predictor(SpyTiles(), config("3d"), 3, pad_value=PAD), SPACING, MARGIN)
    assert res.labels[6, 15, 19] == 2 and (res.labels[5:8, 14:17, 18:21] == 2).sum() >= 5
    assert (res.labels[4:6, 10:12, 12:14] == 1).all()  # stage one's tumour, not confirmed by stage two


def test_the_crop_predictor_gets_exactly_the_box():
    calls = []

    def predict(crop: np.ndarray) -> np.ndarray:
        calls.append(crop.copy())
        probs = np.zeros((3, *crop.shape[1:]), np.float32)
        probs[1] = 1.0
        return probs

    res = two_stage_predict(liver_stage(), IMAGE, predict, SPACING, MARGIN)
    assert len(calls) == 1 and calls[0].shape == (1, *(b - a for a, b in BOX)) and calls[0].dtype == np.float32
    np.testing.assert_array_equal(calls[0][0], IMAGE[tuple(slice(a, b) for a, b in BOX)])
    assert set(np.unique(res.labels)) == {0, 1}  # no tumour called: the liver stage's tumour became liver
    # with context the crop reaches further, the result stays the box's
    calls.clear()
    res = two_stage_predict(liver_stage(), IMAGE[None], predict, SPACING, MARGIN, context=(1, 2, 50))
    assert calls[0].shape == (1, 11, 24, 32) and res.box == BOX and res.probabilities.shape == (3, 10, 20, 22)
    with pytest.raises(ValueError, match="returned shape"):
        two_stage_predict(liver_stage(), IMAGE, lambda crop: np.zeros((3, 1, 1, 1)), SPACING, MARGIN)


def test_no_liver_means_no_tumour_stage():
    spy = SpyTiles()
    labels = np.zeros(SHAPE, np.uint8)
    labels[0, 0, 0] = 3  # another structure, not liver
    res = two_stage_predict(labels, IMAGE, window_predictor(spy, config("3d"), 3, pad_value=PAD), SPACING, MARGIN)
    assert spy.calls == 0 and res.box is None and res.probabilities is None and not res.liver_found
    np.testing.assert_array_equal(res.labels, labels)
    assert res.labels is not labels


def test_liver_stage_at_half_resolution_is_resampled_to_the_tumour_grid():
    full = liver_stage()
    half = liver_labels_in_grid(full, (6, 16, 16))  # as the liver stage sees it in its own, coarser grid
    assert half.shape == (6, 16, 16) and (half == 1).any()
    moved = liver_labels_in_grid(half, SHAPE)
    assert moved.shape == SHAPE and moved.dtype == np.uint8 and set(np.unique(moved)) <= {0, 1, 2}
    # faces on whole half-resolution voxels come back; linear label interpolation rounds off the 8 corners
    assert (moved != full).sum() <= 8 and not ((moved > 0) & (full == 0)).any()
    spy = SpyTiles()
    res = two_stage_predict(half, IMAGE, window_predictor(spy, config("3d"), 3, pad_value=PAD), SPACING, MARGIN)
    ref = two_stage_predict(moved, IMAGE, window_predictor(SpyTiles(), config("3d"), 3, pad_value=PAD), SPACING, MARGIN)
    assert res.labels.shape == SHAPE and res.box == ref.box == liver_roi_box(moved, SPACING, MARGIN)
    np.testing.assert_array_equal(res.labels, ref.labels)
    assert not spy.seen[~inside_box(res.box)].any()
    np.testing.assert_array_equal(res.labels == 2, (moved > 0) & TUMOUR_TRUTH)
    np.testing.assert_array_equal(liver_labels_in_grid(full, SHAPE), full)


def test_box_grows_to_the_patch_inside_the_volume():
    labels = np.zeros(SHAPE, np.uint8)
    labels[11, 31, 30] = 1  # one liver voxel in a corner
    assert liver_roi_box(labels, SPACING, 0.0) == ((11, 12), (31, 32), (30, 31))
    assert liver_roi_box(labels, SPACING, 2.0) == ((10, 12), (29, 32), (28, 32))
    c = config("3d")
    assert stage_min_size(c) == (4, 8, 8) and stage_min_size(config("2d")) == (1, 8, 8)
    assert liver_roi_box(labels, SPACING, 2.0, stage_min_size(c)) == ((8, 12), (24, 32), (24, 32))
    assert stage_context(c) == (0, 0, 0) and stage_context(config("2.5d")) == (1, 0, 0)
    with pytest.raises(ValueError):
        liver_roi_box(labels, SPACING, -1.0)


def test_fused_probabilities_follow_the_two_stage_rule():
    import torch

    from autoliver.infer.two_stage import TwoStageResult, fuse_probabilities

    rng = np.random.default_rng(0)
    p = torch.from_numpy(rng.dirichlet([1, 1, 1], size=(6, 10, 10)).transpose(3, 0, 1, 2).astype(np.float32).copy())
    labels = p.argmax(0).numpy().astype(np.uint8)
    box = ((1, 5), (2, 8), (2, 8))
    q = torch.from_numpy(rng.dirichlet([1, 1, 1], size=(4, 6, 6)).transpose(3, 0, 1, 2).astype(np.float32).copy())
    fused = fuse_probabilities(p, TwoStageResult(labels, q, box))
    assert torch.allclose(fused.sum(0), torch.ones(6, 10, 10), atol=1e-5) and torch.equal(fused[0], p[0])
    liver = np.isin(labels, (1, 2))
    inside = np.zeros_like(liver)
    inside[1:5, 2:8, 2:8] = True
    tumour = fused.argmax(0).numpy() == 2
    assert not (tumour & ~(liver & inside)).any()  # never tumour outside the liver stage's liver and the box
    share = (q[2] / (q[1] + q[2])).numpy()
    expect = liver[1:5, 2:8, 2:8] & (share > 0.5) & ((p[1] + p[2]).numpy()[1:5, 2:8, 2:8] * share > p[0].numpy()[1:5, 2:8, 2:8])
    assert np.array_equal(tumour[1:5, 2:8, 2:8], expect)
    no_liver = fuse_probabilities(p, TwoStageResult(labels, None, None))
    assert not (no_liver.argmax(0) == 2).any()
