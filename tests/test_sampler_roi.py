"""Training patches of a tumour stage: sampled inside the jittered liver box (``LiverRoi``).

The synthetic cases store each voxel's linear index as its image value, so a patch tells
where it was cut: its centre voxel ``size // 2`` decodes to (z, y, x) in the volume.
"""

from __future__ import annotations

import copy
import logging
import math

import numpy as np
import pytest
import torch

from autoliver.data.batches import BatchMaker, BatchSpec
from autoliver.data.loader import LiverRoi, make_train_loader, make_val_loader
from autoliver.data.sampler import (
    FOREGROUND,
    RANDOM,
    TUMOUR,
    jittered_box,
    liver_bbox,
    patch_start,
    roi_patch_start,
)
from autoliver.preprocess.case import class_locations, component_locations
from autoliver.preprocess.storage import save_case
from planning.plans import Configuration

SHAPE = (16, 40, 40)
SPACING = (2.0, 1.5, 1.0)
LIVER = ((4, 10), (10, 24), (25, 40))  # the liver's exact box: touches the volume's x end
MARGIN, JITTER = 4.0, 2.0  # mm
PAD = -1.0


def config(dims: int) -> Configuration:
    patch = (4, 8, 8) if dims == 3 else (8, 8)
    k = ((3,) * dims,) * 2
    return Configuration(name=f"{dims}d", network_dims=dims, data_identifier="fullres", spacing=SPACING, median_shape=SHAPE,
                         patch_size=patch, batch_size=4, n_stages=2, features_per_stage=(4, 8), kernel_sizes=k,
                         strides=((1,) * dims, (2,) * dims))


def write_case(folder, case_id: str, with_liver: bool = True) -> np.ndarray:
    data = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)  # value = linear index (exact in float32)
    seg = np.zeros(SHAPE, dtype=np.uint8)
    if with_liver:
        (z0, z1), (y0, y1), (x0, x1) = LIVER
        seg[z0:z1, y0:y1, x0:x1] = 1
        seg[z0, y0, x0] = 1
        seg[6:8, 15:18, 30:33] = 2  # one tumour
        seg[9, 23, 39] = 2  # and a one-voxel one in the corner
    rng = np.random.default_rng(0)
    props = {"spacing": list(SPACING), "class_locations": class_locations(seg, rng), "tumour_components": component_locations(seg, rng)}
    save_case(folder, case_id, data, seg, props)
    return seg


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    folder = tmp_path_factory.mktemp("roi") / "fullres"
    folder.mkdir()
    seg = write_case(folder, "a")
    write_case(folder, "b")
    write_case(folder, "empty", with_liver=False)
    return folder, seg


def decode(values: np.ndarray) -> np.ndarray:
    return np.stack(np.unravel_index(values.astype(np.int64), SHAPE), axis=-1)


def outer_box(margin_mm: float, jitter_mm: float = 0.0) -> list[tuple[int, int]]:
    """The liver box grown by ``margin_mm`` (whole voxels, rounded up) and ``jitter_mm``
    (rounded to the nearest voxel), clipped to the volume."""
    out = []
    for (a, b), s, n in zip(LIVER, SPACING, SHAPE):
        m = math.ceil(margin_mm / s) + int(np.rint(jitter_mm / s))
        out.append((max(0, a - m), min(n, b + m)))
    return out


def inside(point, box) -> bool:
    return all(a <= int(p) < b for p, (a, b) in zip(point, box))


def centres(batch: dict, dims: int) -> np.ndarray:
    """(B, 3) voxel (z, y, x) at each patch's centre (``size // 2``) from the encoded image."""
    data = batch["data"].numpy()[:, 0]
    if dims == 3:
        mid = data[:, data.shape[1] // 2, data.shape[2] // 2, data.shape[3] // 2]
    else:
        mid = data[:, data.shape[1] // 2, data.shape[2] // 2]
    assert (mid >= 0).all()  # the centre voxel is inside the volume (never padding)
    return decode(mid)


def test_liver_bbox_is_exact(cases):
    _, seg = cases
    assert liver_bbox(seg, slab=3) == LIVER
    assert liver_bbox(np.zeros((3, 4, 5), np.uint8)) is None
    other = np.zeros((5, 6, 7), np.uint8)
    other[1, 2, 3] = 2  # tumour alone is liver structure too
    other[4, 5, 6] = 3  # not a liver label
    assert liver_bbox(other) == ((1, 2), (2, 3), (3, 4))


def test_jitter_moves_every_face_both_ways_within_the_margin_plus_jitter():
    rng = np.random.default_rng(0)
    nominal, outer = outer_box(MARGIN), outer_box(MARGIN, JITTER)
    boxes = np.array([jittered_box(LIVER, SHAPE, SPACING, MARGIN, JITTER, rng) for _ in range(400)])  # (n, 3, 2)
    for axis in range(3):
        for face in range(2):
            v = boxes[:, axis, face]
            assert v.min() >= outer[axis][0] and v.max() <= outer[axis][1]
            if nominal[axis][face] not in (0, SHAPE[axis]):  # a face clipped by the volume cannot move out
                assert v.min() < nominal[axis][face] < v.max(), (axis, face)
    assert jittered_box(LIVER, SHAPE, SPACING, MARGIN, 0.0, rng) == tuple(nominal)  # no jitter: the inference box
    assert jittered_box(LIVER, SHAPE, SPACING, 0.0, 0.0, rng) == LIVER
    assert LiverRoi(10.0).jitter == 5.0 and LiverRoi(10.0, 1.0).jitter == 1.0
    with pytest.raises(ValueError):
        LiverRoi(-1.0)


def test_roi_patch_start_centres_the_patch_in_the_box():
    rng = np.random.default_rng(1)
    for _ in range(300):
        shape = rng.integers(3, 30, 3)
        size = rng.integers(1, 40, 3)
        lo = np.array([rng.integers(0, n) for n in shape])
        hi = np.array([rng.integers(a + 1, n + 1) for a, n in zip(lo, shape)])
        box = list(zip(lo, hi))
        voxel = np.array([rng.integers(a, b) for a, b in box])
        for centre in (None, voxel):
            start = roi_patch_start(shape, size, box, centre, rng)
            assert inside(start + size // 2, box)
            if centre is not None:
                assert np.all((start <= voxel) & (voxel < start + size))  # the chosen voxel stays in the patch
            # inside the volume (patch_start's bounds) whenever the box allows it
            need = np.maximum(size - shape, 0)
            v_lo, v_hi = -(need // 2), shape - size + need - need // 2
            ok = np.maximum(v_lo, lo - size // 2) <= np.minimum(v_hi, hi - 1 - size // 2)
            assert np.all(~ok | ((start >= v_lo) & (start <= v_hi)))


@pytest.mark.parametrize("dims", [3, 2])
def test_every_patch_is_centred_in_its_jittered_box(cases, dims):
    folder, seg = cases
    spec = BatchSpec(folder, ("a",), dims, tuple(config(dims).patch_size), 1, pad_value=PAD, roi=LiverRoi(MARGIN, JITTER),
                     spacing=SPACING)
    maker = BatchMaker(spec)
    rng = np.random.default_rng(3)
    P = 16
    padded_image = np.pad(np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE), P, constant_values=PAD)
    padded_seg = np.pad(seg, P)
    outer, nominal = outer_box(MARGIN, JITTER), outer_box(MARGIN)
    beyond = 0
    size = np.array(config(dims).patch_size)
    for i in range(240):
        kind = (RANDOM, FOREGROUND, TUMOUR)[i % 3]
        box = maker.roi_box("a", copy.deepcopy(rng))  # the box this sample draws first
        data, s = maker.sample("a", kind, rng)
        centre = decode(data[0][tuple(size // 2)])
        assert inside(centre, box) and inside(centre, outer)
        beyond += not inside(centre, nominal)
        seen = data[0][data[0] >= 0]
        assert seen.size and any(inside(p, box) for p in decode(seen))  # overlaps the box
        if kind == TUMOUR:
            assert (s[0] == 2).any()
        elif kind == FOREGROUND:
            assert (s[0] > 0).any()
        # the patch is what the volume holds there, padded outside
        full = np.array((1, *size) if dims == 2 else size)
        start = centre - (np.concatenate([[0], size // 2]) if dims == 2 else size // 2)
        window = tuple(slice(a + P, a + P + n) for a, n in zip(start, full))
        np.testing.assert_array_equal(data.reshape(full), padded_image[window])
        np.testing.assert_array_equal(s.reshape(full), padded_seg[window])
    assert beyond > 0  # the jitter takes some centres past the nominal margin


def test_loader_with_roi(cases):
    folder, _ = cases
    roi = LiverRoi(MARGIN, JITTER)
    outer = outer_box(MARGIN, JITTER)
    for dims in (3, 2):
        with make_val_loader(folder, ["a", "b"], config(dims), seed=1, pad_value=PAD, roi=roi, oversample_foreground=0.5) as loader:
            for _, batch in zip(range(10), loader):
                assert all(inside(c, outer) for c in centres(batch, dims))
                assert (batch["target"][-2:] > 0).flatten(1).any(1).all()  # forced foreground still holds liver
    with pytest.raises(TypeError):
        make_val_loader(folder, ["a"], config(3), pad_value=PAD, roi=4.0)


def first(loader, n=3):
    with loader:
        return [next(loader) for _ in range(n)]


def same(a, b) -> bool:
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_roi_none_gives_exactly_the_batches_without_it(cases):
    folder, _ = cases
    ids = ["a", "b", "empty"]
    for dims in (3, 2):
        c = config(dims)
        plain = first(make_train_loader(folder, ids, c, seed=7, n_workers=0, pad_value=PAD))
        assert same(plain, first(make_train_loader(folder, ids, c, seed=7, n_workers=0, pad_value=PAD, roi=None)))
        val = first(make_val_loader(folder, ids, c, seed=2, pad_value=PAD))
        assert same(val, first(make_val_loader(folder, ids, c, seed=2, pad_value=PAD, roi=None)))
        roi = first(make_val_loader(folder, ids, c, seed=2, pad_value=PAD, roi=LiverRoi(MARGIN)))
        assert not same(val, roi)


def test_roi_loader_is_deterministic_with_workers(cases):
    folder, _ = cases
    c, roi = config(3), LiverRoi(MARGIN, JITTER)

    def run(workers):
        return first(make_train_loader(folder, ["a", "b"], c, seed=5, n_workers=workers, pad_value=PAD, roi=roi, batch_size=2))

    zero = run(0)
    assert same(zero, run(0))
    assert same(zero, run(1))  # a worker draws what the main process draws
    two = run(2)
    assert same(two, run(2))


def test_case_without_liver_falls_back_to_the_whole_volume(cases, caplog):
    folder, _ = cases
    patch = tuple(config(3).patch_size)
    with_roi = BatchMaker(BatchSpec(folder, ("empty",), 3, patch, 1, pad_value=PAD, roi=LiverRoi(MARGIN), spacing=SPACING))
    plain = BatchMaker(BatchSpec(folder, ("empty",), 3, patch, 1, pad_value=PAD))
    with caplog.at_level(logging.WARNING, logger="autoliver.data.batches"):
        assert with_roi.roi_box("empty", np.random.default_rng(0)) is None
    assert "no liver" in caplog.text and "empty" in caplog.text
    r1, r2 = np.random.default_rng(4), np.random.default_rng(4)
    starts = []
    for _ in range(60):  # the draws of a loader without ROI
        d1, s1 = with_roi.sample("empty", RANDOM, r1)
        d2, s2 = plain.sample("empty", RANDOM, r2)
        np.testing.assert_array_equal(d1, d2)
        np.testing.assert_array_equal(s1, s2)
        starts.append(decode(d1[0, 0, 0, 0])[()])
    assert np.array_equal(starts[0], patch_start(SHAPE, patch, None, np.random.default_rng(4)))
    starts = np.array(starts)
    assert (np.ptp(starts, axis=0) > (np.array(SHAPE) - patch) / 2).all()  # over the whole volume
    # through the loader too: a case list with and without liver
    with make_val_loader(folder, ["empty"], config(3), seed=0, pad_value=PAD, roi=LiverRoi(MARGIN)) as loader:
        with make_val_loader(folder, ["empty"], config(3), seed=0, pad_value=PAD) as ref:
            assert same([next(loader)], [next(ref)])
