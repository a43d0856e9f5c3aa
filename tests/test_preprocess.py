"""Normalisation, preprocess_case and the round trip back to the original geometry on real CT."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from autoliver import examples
from autoliver.io.images import Geometry, read_image, write_image
from autoliver.preprocess.case import map_back, map_back_probabilities, preprocess_case
from autoliver.preprocess.normalise import normalise_ct
from planning.plans import Normalisation, Plans

NORM = Normalisation("ct", -17.0, 201.0, 99.0, 39.0)


def make_plans(**spacings) -> Plans:
    return Plans("Dataset001_Test", "f" * 64, "cpu", 8.0, {"background": 0, "liver": 1, "tumour": 2}, NORM,
                 {k: tuple(v) for k, v in spacings.items()}, {})


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def lits():
    image, geometry = read_image(examples.image_path("lits117_128cube"))
    label, _ = read_image(examples.label_path("lits117_128cube"))
    return image, geometry, label


@pytest.fixture(scope="module")
def chaos():
    image, geometry = read_image(examples.image_path("chaos_ct_sample"))
    label, _ = read_image(examples.label_path("chaos_ct_sample"))
    return image, geometry, label


def test_normalise_against_numpy():
    rng = np.random.default_rng(0)
    image = rng.integers(-1024, 3000, size=(4, 5, 6)).astype(np.int16)
    ref = (np.clip(image.astype(np.float64), NORM.clip_low, NORM.clip_high) - NORM.mean) / NORM.std
    out = normalise_ct(image, NORM)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    f = image.astype(np.float32)
    before = f.copy()
    normalise_ct(f, NORM)
    np.testing.assert_array_equal(f, before)  # pure: input untouched
    with pytest.raises(ValueError):
        normalise_ct(image, Normalisation("ct", 0.0, 1.0, 0.0, 0.0))


def check_roundtrip(tmp_path, image, geometry, label, plans, ident):
    data, seg, props = preprocess_case(image, geometry, label, plans, ident)
    props = json.loads(json.dumps(props))  # survives the JSON boundary
    assert data.dtype == np.float16 and seg.dtype == np.uint8
    assert tuple(props["shape_after_resampling"]) == data.shape == seg.shape
    # the crop box holds every labelled voxel
    box = props["crop_box"]
    inside = np.zeros(label.shape, bool)
    inside[tuple(slice(lo, hi) for lo, hi in box)] = True
    assert not label[~inside].any()
    back = map_back(seg, props)
    path = tmp_path / f"{ident}.nii.gz"
    write_image(path, back, Geometry.from_json(props["geometry"]))
    written = sitk.ReadImage(str(path))
    assert written.GetSize() == tuple(reversed(image.shape))
    assert written.GetSpacing() == tuple(reversed(geometry.spacing))
    assert written.GetOrigin() == geometry.origin
    assert written.GetDirection() == geometry.direction
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), back)
    return data, seg, props, back


def test_roundtrip_lits117_at_1_5_mm(tmp_path, lits):
    image, geometry, label = lits
    plans = make_plans(fullres=(1.5, 1.5, 1.5))
    data, seg, props, back = check_roundtrip(tmp_path, image, geometry, label, plans, "fullres")
    assert data.shape == (85, 85, 85)
    assert dice(back == 1, label == 1) > 0.95
    assert dice(back == 2, label == 2) > 0.9
    # normalised intensities lie in the clipped range
    lo, hi = (NORM.clip_low - NORM.mean) / NORM.std, (NORM.clip_high - NORM.mean) / NORM.std
    d = data.astype(np.float32)
    assert d.min() >= lo - 1e-2 and d.max() <= hi + 1e-2  # cubic overshoot clipped
    # foreground locations: on their class, capped, and every tumour component has some
    for c in ("1", "2"):
        locs = np.array(props["class_locations"][c])
        assert 0 < len(locs) <= 10000
        assert (seg[tuple(locs.T)] == int(c)).all()
    comps = props["tumour_components"]
    _, n = ndimage.label(seg == 2, structure=np.ones((3, 3, 3)))
    assert comps["count"] == n == len(comps["locations"]) == len(comps["sizes"])
    for locs, size in zip(comps["locations"], comps["sizes"]):
        assert 1 <= len(locs) <= min(size, 10)
        assert (seg[tuple(np.array(locs).T)] == 2).all()


def test_roundtrip_chaos_anisotropic_to_1mm(tmp_path, chaos):
    image, geometry, label = chaos
    assert geometry.spacing[0] == 2.0
    plans = make_plans(fullres=(1.0, 1.0, 1.0), lowres=(2.5, 1.9, 1.9))
    data, seg, props, back = check_roundtrip(tmp_path, image, geometry, label, plans, "fullres")
    assert data.shape[0] == 2 * image.shape[0]
    assert dice(back == 1, label == 1) > 0.97
    assert props["crop_box"][1] != [0, 512]  # the body crop removed air in y
    assert props["class_locations"]["2"] == [] and props["tumour_components"]["count"] == 0


def test_same_input_same_output_and_seed_recorded(lits):
    image, geometry, label = lits
    plans = make_plans(fullres=(1.2, 1.2, 1.2))
    a = preprocess_case(image, geometry, label, plans, "fullres", seed=5)
    b = preprocess_case(image, geometry, label, plans, "fullres", seed=5)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[2] == b[2] and a[2]["seed"] == 5


def test_without_label_and_probabilities_map_back(lits):
    image, geometry, _ = lits
    plans = make_plans(fullres=(2.0, 2.0, 2.0))
    data, seg, props = preprocess_case(image, geometry, None, plans, "fullres")
    assert seg is None and "class_locations" not in props
    probs = np.zeros((3,) + data.shape, np.float32)
    probs[0] = 1.0
    back = map_back_probabilities(probs, props)
    assert back.shape == (3,) + geometry.shape
    np.testing.assert_allclose(back.sum(axis=0), 1.0, atol=1e-5)
    with pytest.raises(ValueError):
        map_back(np.zeros((3, 3, 3), np.uint8), props)
    with pytest.raises(ValueError):
        preprocess_case(image, geometry, None, plans, "lowres")
