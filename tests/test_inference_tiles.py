"""Throughput tiling (``throughput_tiling``): the fewest computed voxels within a tile budget,
checked against its invariants and against the patch-sized window it replaces."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autoliver.infer.sliding_window import Window, sliding_window_predict, throughput_tiling, tile_starts


def computed(tile, starts) -> int:
    return math.prod(tile) * math.prod(len(s) for s in starts)


def check_invariants(shape, patch, divisor, budget, step):
    tile, starts = throughput_tiling(shape, patch, divisor, budget, step)
    overlap = [round((1 - step) * p) for p in patch]
    for s, p, d, t, st_, ov in zip(shape, patch, divisor, tile, starts, overlap):
        assert t % d == 0  # the network's stride divides the tile
        assert t >= min(-(-p // d) * d, -(-s // d) * d)  # never below the patch unless the axis is
        assert st_[0] == 0
        if t >= s:
            assert st_ == [0]  # one tile, the axis padded up to it
        else:
            assert st_[-1] == s - t  # the last tile flush with the far border: every voxel covered
            assert all(t - (b - a) >= ov for a, b in zip(st_, st_[1:]))  # neighbours overlap enough
    return tile, starts


@settings(max_examples=300, deadline=None)
@given(shape=st.tuples(*[st.integers(1, 400)] * 3), patch=st.tuples(*[st.sampled_from([16, 32, 48, 56, 64, 80, 96, 128])] * 3),
       divisor=st.tuples(*[st.sampled_from([1, 4, 8, 16])] * 3), budget_factor=st.floats(0.5, 16), step=st.sampled_from([0.5, 0.6, 0.75, 1.0]))
def test_tiling_invariants_and_never_more_work_than_the_patch_window(shape, patch, divisor, budget_factor, step):
    budget = int(math.prod(patch) * budget_factor)
    tile, starts = check_invariants(shape, patch, divisor, budget, step)
    aligned = all(p % d == 0 for p, d in zip(patch, divisor))
    if budget >= math.prod(patch) and aligned:
        assert math.prod(tile) <= budget
        patch_window = math.prod(patch) * math.prod(len(tile_starts(max(s, p), p, step)) for s, p in zip(shape, patch))
        assert computed(tile, starts) <= patch_window


def test_one_tile_when_the_volume_fits_and_the_best_split_otherwise():
    tile, starts = throughput_tiling((60, 80, 90), (64, 56, 64), (16, 8, 16), 700_000)
    assert tile == (64, 80, 96) and starts == [[0], [0], [0]]
    tile, starts = throughput_tiling((13, 167, 167), (64, 56, 64), (16, 8, 16), 700_000)
    assert tile == (16, 168, 176)  # a thin volume is not padded up to the patch's 64 slices
    # brute force over every tile count per axis: nothing computes fewer voxels within the budget
    shape, patch, div, budget = (100, 131, 131), (64, 56, 64), (16, 8, 16), 633_000
    tile, starts = throughput_tiling(shape, patch, div, budget)
    best = None
    for ks in itertools.product(range(1, 8), repeat=3):
        t = [max(min(-(-p // d) * d, -(-s // d) * d), -(-math.ceil((s + (k - 1) * p // 2) / k) // d) * d)
             for s, p, d, k in zip(shape, patch, div, ks)]
        if math.prod(t) <= budget:
            cost = math.prod(t) * math.prod(ks)
            best = cost if best is None else min(best, cost)
    assert computed(tile, starts) == best


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="same axes"):
        throughput_tiling((10, 10), (8, 8, 8), (1, 1, 1), 1000)
    with pytest.raises(ValueError, match="step"):
        throughput_tiling((10, 10, 10), (8, 8, 8), (1, 1, 1), 1000, step=0)
    with pytest.raises(ValueError, match="positive"):
        throughput_tiling((0, 10, 10), (8, 8, 8), (1, 1, 1), 1000)


def test_a_per_voxel_network_gives_the_same_result_with_any_tiling():
    """Stitching with large tiles is exact where the network's output does not depend on context."""
    image = torch.randn(1, 37, 50, 45)

    def net(x):
        return torch.cat([x, 2 * x, -x], dim=1)

    patch_window = sliding_window_predict(net, image, Window((16, 16, 16), step=0.5))
    tile, starts = throughput_tiling(image.shape[1:], (16, 16, 16), (8, 8, 8), 12_000)
    assert len(starts[0]) * len(starts[1]) * len(starts[2]) > 1  # several tiles, overlapping
    big = sliding_window_predict(net, image, Window(tile, step=0.5, starts=starts))
    torch.testing.assert_close(big, patch_window, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(big[0], image[0], atol=1e-5, rtol=1e-5)
