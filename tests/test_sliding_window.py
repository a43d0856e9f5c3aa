"""Sliding window: covers every voxel, exact for a local predictor, pads small inputs, 2D/2.5D."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from autoliver.infer.sliding_window import (
    Window,
    gaussian_weights,
    predict_slicewise,
    sliding_window_predict,
    sliding_window_predict_batch,
    stack_slices,
    tile_starts,
)


@pytest.mark.parametrize("size,patch,step", [(10, 4, 0.5), (17, 5, 0.5), (64, 64, 0.5), (65, 64, 0.5), (100, 7, 1.0), (31, 8, 0.33)])
def test_tile_starts_cover_every_index_with_bounded_step(size, patch, step):
    starts = tile_starts(size, patch, step)
    covered = np.zeros(size, dtype=bool)
    for s in starts:
        assert s >= 0 and s + patch <= size
        covered[s : s + patch] = True
    assert covered.all()
    assert all(b - a <= patch * step + 1 for a, b in zip(starts, starts[1:]))
    assert starts == sorted(set(starts))


def test_tile_starts_small_image_and_bad_step():
    assert tile_starts(3, 8, 0.5) == [0]
    with pytest.raises(ValueError):
        tile_starts(10, 4, 0.0)


def test_gaussian_peak_centre_no_zeros():
    g = gaussian_weights((9, 16, 7))
    assert g.shape == (9, 16, 7) and float(g.max()) == pytest.approx(1.0)
    assert float(g.min()) > 0
    assert g[4, 7:9, 3].max() == g.max()
    assert torch.allclose(g, g.flip(0)) and torch.allclose(g, g.flip(1))


def counting_predictor(n_classes):
    """Returns ones: with Gaussian weights the stitched result is exactly 1 wherever covered."""
    return lambda x: torch.ones((x.shape[0], n_classes, *x.shape[2:]))


@pytest.mark.parametrize("shape,patch", [((20, 33, 41), (8, 16, 16)), ((5, 7, 9), (8, 16, 16)), ((16, 16, 16), (16, 16, 16)), ((30, 50), (16, 24))])
def test_every_voxel_covered_and_normalised(shape, patch):
    img = torch.randn(1, *shape)
    out = sliding_window_predict(counting_predictor(3), img, Window(patch, step=0.5, n_classes=3))
    assert out.shape == (3, *shape)
    assert torch.allclose(out, torch.ones_like(out))  # every voxel got weight (no 0/0, no gaps)


def test_local_predictor_is_reproduced_exactly():
    # a per-voxel (1x1x1) predictor gives the same output whatever the tiling
    w = torch.randn(3, 2)
    pred = lambda x: torch.einsum("kc,bc...->bk...", w, x)
    img = torch.randn(2, 19, 27, 22)
    out = sliding_window_predict(pred, img, Window((8, 12, 10), step=0.4, n_classes=3, tiles_per_call=3))
    assert torch.allclose(out, pred(img[None])[0], atol=1e-5)


def test_conv_predictor_matches_whole_image_away_from_tile_borders():
    # a 3x3x3 mean filter differs at tile borders only through padding; with a large overlap
    # the Gaussian-weighted result stays close to the whole-image result inside the volume
    torch.manual_seed(0)
    img = torch.randn(1, 24, 24, 24)
    pred = lambda x: F.avg_pool3d(x, 3, stride=1, padding=1).repeat(1, 2, 1, 1, 1)
    whole = pred(img[None])[0]
    out = sliding_window_predict(pred, img, Window((12, 12, 12), step=0.25, n_classes=2))
    inner = (slice(None), slice(2, -2), slice(2, -2), slice(2, -2))
    assert (out[inner] - whole[inner]).abs().mean() < 0.05


def test_small_input_padded_with_value_and_cropped_back():
    seen = []

    def pred(x):
        seen.append(x.clone())
        return x[:, :1].repeat(1, 2, 1, 1, 1)

    img = torch.full((1, 3, 5, 6), 2.0)
    out = sliding_window_predict(pred, img, Window((4, 8, 8), n_classes=2, pad_value=-7.0))
    assert out.shape == (2, 3, 5, 6) and torch.allclose(out, torch.full_like(out, 2.0))
    assert seen[0].shape == (1, 1, 4, 8, 8)
    assert float(seen[0].min()) == -7.0  # padding used the given value
    per_channel = sliding_window_predict_batch(lambda x: x, torch.zeros(1, 2, 3, 3), Window((5, 5), n_classes=2, pad_value=[-1.0, 0.5]))
    assert per_channel.shape == (1, 2, 3, 3)


def test_predictor_shape_is_checked():
    with pytest.raises(ValueError, match="predictor returned"):
        sliding_window_predict(lambda x: x, torch.zeros(1, 8, 8), Window((4, 4), n_classes=3))
    with pytest.raises(ValueError):
        sliding_window_predict(lambda x: x, torch.zeros(8, 8), Window((4, 4)))


def test_stack_slices_replicates_edges():
    vol = torch.arange(5, dtype=torch.float32)[None, :, None, None].expand(1, 5, 2, 2)
    s = stack_slices(vol, [0, 2, 4], 3)
    assert s.shape == (3, 3, 2, 2)
    assert s[:, :, 0, 0].tolist() == [[0, 0, 1], [1, 2, 3], [3, 4, 4]]


def test_predict_slicewise_2d_and_25d():
    vol = torch.randn(1, 7, 20, 18)
    # 2D: a per-pixel predictor on the centre channel gives the volume back slice by slice
    pred = lambda x: x[:, x.shape[1] // 2 : x.shape[1] // 2 + 1].repeat(1, 3, 1, 1)
    out = predict_slicewise(pred, vol, Window((16, 16), n_classes=3), in_slices=1, slices_per_call=3)
    assert torch.allclose(out[0], vol[0], atol=1e-5)
    # 2.5d with 3 slices: the predictor sees (slice-1, slice, slice+1); use the mean of them
    pred25 = lambda x: x.mean(1, keepdim=True).repeat(1, 3, 1, 1)
    out = predict_slicewise(pred25, vol, Window((16, 16), n_classes=3), in_slices=3, slices_per_call=4)
    padded = torch.cat([vol[:, :1], vol, vol[:, -1:]], 1)
    ref = (padded[0, :-2] + padded[0, 1:-1] + padded[0, 2:]) / 3
    assert torch.allclose(out[0], ref, atol=1e-5)
    # extra channels (cascade) are appended after the image channels
    extra = torch.zeros(2, 7, 20, 18)
    extra[1] = 1.0
    predx = lambda x: x[:, -1:].repeat(1, 3, 1, 1)
    out = predict_slicewise(predx, vol, Window((16, 16), n_classes=3), in_slices=3, extra=extra)
    assert torch.allclose(out, torch.ones_like(out))
