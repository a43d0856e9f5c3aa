"""Patch sampling: bounds, padded reads, foreground share, tumour components, 2.5d stacking."""

from __future__ import annotations

import copy
import math

import blosc2
import numpy as np
import pytest
from scipy import ndimage

from autoliver.api import StageOptions, plan_and_preprocess
from autoliver.core.layout import Workspace
from autoliver.data import make_val_loader
from autoliver.data.batches import BatchMaker, BatchSpec
from autoliver.data.sampler import RANDOM, TUMOUR, CaseIndex, n_forced, patch_start, read_region
from autoliver.examples.phantom import make_phantom, write_phantom_dataset
from autoliver.preprocess.case import class_locations, component_locations
from autoliver.preprocess.storage import list_cases, load_case, save_case
from planning.plans import Plans


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("ws"))
    root = write_phantom_dataset(ws.raw, 3, np.random.default_rng(0), shape=(40, 96, 96), spacing=(4.0, 4.0, 4.0))
    summary = plan_and_preprocess(root, ws, configurations=["2d", "2.5d", "3d_fullres"], device="cpu",
                                  options=StageOptions(progress=False))
    plans = Plans.load(summary.plans_path)
    folder = summary.folders["fullres"]
    return plans, folder, list_cases(folder)


def test_patch_start_bounds_match_brute_force():
    rng = np.random.default_rng(0)
    for shape, size in [((10, 50), (4, 20)), ((3, 7), (8, 7)), ((5, 5), (9, 2))]:
        starts = np.array([patch_start(shape, size, None, rng) for _ in range(400)])
        for ax in range(2):
            need = max(size[ax] - shape[ax], 0)
            lo, hi = -(need // 2), shape[ax] - size[ax] + need - need // 2
            assert starts[:, ax].min() == lo and starts[:, ax].max() == hi  # every allowed start, no other
        for centre in [(0, 0), (shape[0] - 1, shape[1] - 1), (shape[0] // 2, 3)]:
            s = patch_start(shape, size, centre, rng)
            assert all(s[a] <= centre[a] < s[a] + size[a] for a in range(2))  # the centre voxel is in the patch


def test_read_region_against_padded_reference(tmp_path):
    rng = np.random.default_rng(1)
    full = rng.normal(size=(9, 33, 40)).astype(np.float16)
    arr = blosc2.asarray(full, urlpath=str(tmp_path / "a.b2nd"), mode="w", chunks=(4, 16, 16), blocks=(2, 8, 8))
    pad = 7
    ref = np.pad(full, pad, constant_values=-3.0)
    for _ in range(60):
        size = rng.integers(1, 20, 3)
        start = [int(rng.integers(-pad, s + pad - n + 1)) for s, n in zip(full.shape, size)]
        out = read_region(arr, start, size, -3.0)
        want = ref[tuple(slice(a + pad, a + pad + n) for a, n in zip(start, size))]
        assert out.shape == tuple(size) and out.dtype == np.float16
        np.testing.assert_array_equal(out, want)
    # clamped axis: edge slices repeat (2.5d at the volume's ends)
    for z0 in (-2, 0, 7, 8):
        out = read_region(arr, (z0, -3, 30), (5, 10, 12), -3.0, clamp_axes=(0,))
        idx = np.clip(np.arange(z0, z0 + 5), 0, 8)
        want = ref[:, pad - 3: pad + 7, pad + 30: pad + 42][pad:-pad][idx]
        np.testing.assert_array_equal(out, want)
    assert (read_region(arr, (20, 0, 0), (2, 3, 3), 5.0) == 5.0).all()  # wholly outside


def test_n_forced_is_at_least_the_share():
    rng = np.random.default_rng(0)
    for b in range(2, 13):
        for share in (0.0, 0.33, 0.5, 1.0):
            assert n_forced(b, share, rng) >= share * b - 1e-9
            assert n_forced(b, share, rng) == math.ceil(share * b - 1e-9)
    ones = [n_forced(1, 0.33, rng) for _ in range(2000)]
    assert 0.28 < np.mean(ones) < 0.38
    with pytest.raises(ValueError):
        n_forced(2, 1.5, rng)


@pytest.mark.parametrize("name", ["3d_fullres", "2d"])
def test_foreground_share_per_batch(prep, name):
    plans, folder, cases = prep
    config = plans.configurations[name]
    with make_val_loader(folder, cases, config, seed=3, oversample_foreground=0.5, batch_size=4) as loader:
        for _, batch in zip(range(8), loader):
            has_fg = (batch["target"] > 0).flatten(1).any(dim=1)
            assert int(has_fg.sum()) >= 2, name
            assert (batch["forced"][-2:] > 0).all() and (batch["forced"][:2] == 0).all()
        stats = loader.stats()
    assert stats.patches == 32 and stats.forced_foreground + stats.forced_tumour == 16
    assert 0.0 < stats.tumour_share <= 1.0


@pytest.fixture(scope="module")
def big_and_tiny(tmp_path_factory):
    """One case: the phantom's liver with one big (radius 7) and one tiny (7 voxels) tumour."""
    image, label = make_phantom((40, 72, 72), (5.0, 5.0, 5.0), np.random.default_rng(4), n_tumours=0)
    label[label == 2] = 1
    liver = ndimage.binary_erosion(label == 1, iterations=3)
    dist = ndimage.distance_transform_edt(liver)
    big_c = np.unravel_index(np.argmax(dist), dist.shape)
    zz, yy, xx = np.ogrid[: label.shape[0], : label.shape[1], : label.shape[2]]
    big = (zz - big_c[0]) ** 2 + (yy - big_c[1]) ** 2 + (xx - big_c[2]) ** 2 <= 7 ** 2
    far = liver & ~ndimage.binary_dilation(big, iterations=6)
    tiny_c = np.argwhere(far)[len(np.argwhere(far)) // 2]
    tiny = np.zeros_like(big)
    tiny[tuple(tiny_c)] = True
    tiny = ndimage.binary_dilation(tiny)  # 7-voxel cross
    label[big | tiny] = 2
    folder = tmp_path_factory.mktemp("bt")
    rng = np.random.default_rng(0)
    props = {"class_locations": class_locations(label, rng), "tumour_components": component_locations(label, rng)}
    save_case(folder, "case", image.astype(np.float16) / 100, label, props)
    return folder, tiny, big


def _holds_tiny(seg: np.ndarray, tiny_size: int) -> bool:
    """A whole tumour component of at most ``tiny_size`` voxels lies inside the patch (the big
    tumour is larger than the patch along z, so no whole component of it fits)."""
    comps, n = ndimage.label(seg == 2, structure=np.ones((3, 3, 3)))
    for i, sl in enumerate(ndimage.find_objects(comps), start=1):
        touches = any(s.start == 0 or s.stop == dim for s, dim in zip(sl, seg.shape))
        if not touches and (comps[sl] == i).sum() <= tiny_size:
            return True
    return False


def test_tiny_tumour_component_is_sampled_as_often_as_the_big_one(big_and_tiny):
    folder, tiny, big = big_and_tiny
    comps = load_case(folder, "case")[2]["tumour_components"]
    assert sorted(comps["sizes"]) == sorted([int(tiny.sum()), int(big.sum())])
    maker = BatchMaker(BatchSpec(folder, ("case",), 3, (8, 16, 16), 1))
    rng = np.random.default_rng(5)
    n = 200
    hits = 0
    for _ in range(n):
        _, seg = maker.sample("case", TUMOUR, rng)
        assert (seg[0] == 2).any()  # a tumour-forced patch always shows tumour
        hits += _holds_tiny(seg[0], int(tiny.sum()))
    # components are drawn uniformly: the 7-voxel tumour is in about half of the tumour patches
    assert 0.35 < hits / n < 0.65, hits
    # drawing from the pooled tumour voxels instead would almost never show it
    assert tiny.sum() / (tiny.sum() + big.sum()) < 0.01


def test_25d_channels_are_adjacent_slices(prep):
    plans, folder, cases = prep
    config = plans.configurations["2.5d"]
    k = config.in_slices
    assert k == 3
    spec = BatchSpec(folder, tuple(cases), 2, tuple(config.patch_size), 1, in_slices=k, pad_value=-9.0)
    maker = BatchMaker(spec)
    rng = np.random.default_rng(2)
    py, px = config.patch_size
    for i in range(60):
        case_id = cases[i % len(cases)]
        full, seg_full, _ = load_case(folder, case_id, mmap=False)
        replay = copy.deepcopy(rng)
        data, seg = maker.sample(case_id, RANDOM, rng)
        z = int(replay.integers(full.shape[0]))
        y0, x0 = patch_start(full.shape[1:], (py, px), None, replay)
        pad_y, pad_x = max(0, -y0), max(0, -x0)
        ref = np.pad(full.astype(np.float32), ((0, 0), (pad_y, py), (pad_x, px)), constant_values=-9.0)
        ref_seg = np.pad(seg_full, ((0, 0), (pad_y, py), (pad_x, px)))
        zs = np.clip(np.arange(z - k // 2, z + k // 2 + 1), 0, full.shape[0] - 1)
        window = (slice(y0 + pad_y, y0 + pad_y + py), slice(x0 + pad_x, x0 + pad_x + px))
        assert data.shape == (k, py, px) and seg.shape == (1, py, px)
        np.testing.assert_array_equal(data, ref[(zs,) + window])
        np.testing.assert_array_equal(seg[0], ref_seg[(z,) + window])


def test_case_index_falls_back_to_tumour_without_liver():
    props = {"class_locations": {"1": [], "2": [[1, 2, 3]]}, "tumour_components": {"locations": [[[1, 2, 3]]]}}
    idx = CaseIndex.from_properties("c", props, (4, 5, 6))
    assert idx.has_tumour and idx.foreground.tolist() == [[1, 2, 3]]
    empty = CaseIndex.from_properties("c", {}, (4, 5, 6))
    assert not empty.has_tumour and empty.foreground.shape == (0, 3)
