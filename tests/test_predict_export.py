"""Mapping probabilities back to the input grid: only the ROI is resampled, the result equals
resampling the whole preprocessed volume, and no float32 multi-channel full-size copy is made."""

import tracemalloc

import numpy as np
import pytest
import torch

from autoliver.infer.sliding_window import argmax_labels, softmax_
from autoliver.io.images import Geometry
from autoliver.preprocess.case import map_back_probabilities
from autoliver.preprocess.resample import resample_probabilities
from planning.crop import crop

GEOM = Geometry((30, 50, 45), (2.0, 0.8, 0.8), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
CROP_BOX = ((3, 27), (5, 48), (2, 40))
PROPS = {"geometry": GEOM.to_json(), "crop_box": [list(b) for b in CROP_BOX], "shape_after_crop": [24, 43, 38],
         "shape_after_resampling": [19, 30, 27]}


def reference(full):
    ref = np.zeros((3,) + GEOM.shape, np.float32)
    ref[0] = 1.0
    crop(ref, CROP_BOX)[...] = resample_probabilities(full, PROPS["shape_after_crop"])
    return ref


@pytest.mark.parametrize("box", [((4, 12), (6, 20), (3, 25)), ((0, 19), (0, 30), (0, 27)), ((18, 19), (29, 30), (0, 1))])
def test_roi_map_back_equals_whole_volume_resampling(box):
    rng = np.random.default_rng(0)
    probs = rng.random((3, 19, 30, 27)).astype(np.float32)
    probs /= probs.sum(0)
    inside = (slice(None), *(slice(a, b) for a, b in box))
    full = np.zeros_like(probs)
    full[0] = 1.0
    full[inside] = probs[inside]
    got = map_back_probabilities(np.ascontiguousarray(probs[inside]), PROPS, box)
    np.testing.assert_allclose(got, reference(full), atol=1e-5)
    half = map_back_probabilities(np.ascontiguousarray(probs[inside]), PROPS, box, dtype=np.float16)
    assert half.dtype == np.float16
    np.testing.assert_allclose(half.astype(np.float32), reference(full), atol=1e-3)
    with pytest.raises(ValueError, match="box"):
        map_back_probabilities(probs, PROPS, box if box[0] != (0, 19) else ((1, 19), (0, 30), (0, 27)))


def test_map_back_makes_no_float32_multichannel_copy(monkeypatch):
    import autoliver.preprocess.case as case

    monkeypatch.setattr(case, "CHUNK_SLICES_VOXELS", 4 * 160 * 160)  # 4 output slices per chunk
    big = Geometry((40, 160, 160), (1.0, 0.8, 0.8), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    props = {"geometry": big.to_json(), "crop_box": [[0, 40], [0, 160], [0, 160]], "shape_after_crop": [40, 160, 160],
             "shape_after_resampling": [20, 64, 64]}
    probs = np.full((3, 20, 64, 64), 1 / 3, np.float32)
    tracemalloc.start()
    out = map_back_probabilities(probs, props, dtype=np.float16)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    float32_copy = 3 * 40 * 160 * 160 * 4
    assert peak < out.nbytes + 0.25 * float32_copy  # the float16 result plus small chunks
    np.testing.assert_allclose(out.astype(np.float32), 1 / 3, atol=1e-3)


def test_in_place_softmax_and_chunked_argmax():
    logits = torch.randn(3, 21, 5, 6)
    ref = torch.softmax(logits, 0)
    ptr = logits.data_ptr()
    out = softmax_(logits, chunk=4)
    assert out.data_ptr() == ptr and torch.allclose(out, ref, atol=1e-6)
    labels = argmax_labels(out, chunk=4)
    assert labels.dtype == np.uint8 and np.array_equal(labels, ref.argmax(0).numpy())
    assert np.array_equal(argmax_labels(ref.numpy(), chunk=5), labels)
