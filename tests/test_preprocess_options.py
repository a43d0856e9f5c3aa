"""Voxel-changing preprocessing options of derived data folders (``plans.data_preprocessing``):
each intensity function against scipy / scikit-image / numpy called directly, the order of
``apply_options``, the planned path against a frozen copy of the committed code, pad values,
and the recipes' data folders end to end on phantoms (values, shapes, map back, staleness)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage
from skimage import exposure

from autoliver import examples
from autoliver.examples.phantom import make_phantom, write_phantom_dataset
from autoliver.io.dataset import open_dataset
from autoliver.io.images import Geometry, read_image
from autoliver.preprocess import intensity
from autoliver.preprocess.case import iter_preprocessed, map_back, map_back_probabilities, preprocess_case, resample_hu
from autoliver.preprocess.intensity import apply_options, clahe_slices, equalise_histogram, smooth, window, zscore
from autoliver.preprocess.normalise import ZSCORE_PAD_FALLBACK, air_pad_value, normalise_ct, pad_value_for
from autoliver.preprocess.resample import is_anisotropic, new_shape_for, resample_labels, resample_to_shape
from autoliver.preprocess.runner import DATASET_PROPERTIES, folder_pad_value, preprocess_dataset
from autoliver.preprocess.storage import list_cases, load_case, load_properties
from planning.crop import BODY_THRESHOLD_HU, body_bbox, crop
from planning.planner import plan_experiment
from planning.plans import Normalisation, Plans
from planning.recipes import derive
from tests.test_planner import make_fingerprint

NORM = Normalisation("ct", -17.0, 201.0, 99.0, 39.0)
SPACING = (5.0, 5.0, 5.0)
SHAPE = (24, 64, 64)
RECIPES = ("mixpool_cascade", "unet2d_clahe", "dualpath3d")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


@pytest.fixture(scope="module")
def phantom():
    image, label = make_phantom((12, 64, 64), (6.0, 5.0, 5.0), np.random.default_rng(1), n_tumours=2)
    return image, label


@pytest.fixture(scope="module")
def plans() -> Plans:
    """The planner's plans for the phantoms' spacing, with the three recipes' data folders."""
    p = plan_experiment(make_fingerprint(SPACING, SHAPE, 2), memory_gb=8.0)
    for r in RECIPES:
        p = derive(p, r)
    return p


def ident_of(plans: Plans, configuration: str) -> str:
    return plans.configurations[configuration].data_identifier


# --- each function against its reference ---------------------------------------------------

def test_smooth_matches_scipy(phantom):
    image, _ = phantom
    before = image.copy()
    for sigma in (1.0, (0.5, 1.0, 2.0)):
        out = smooth(image, sigma)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, ndimage.gaussian_filter(image.astype(np.float32), sigma, mode="nearest"))
    np.testing.assert_array_equal(image, before)
    np.testing.assert_array_equal(smooth(image, 0.0), image.astype(np.float32))


def test_window_matches_numpy_clip_formula():
    rng = np.random.default_rng(0)
    image = rng.integers(-1024, 3000, size=(4, 9, 11)).astype(np.int16)
    out = window(image, -100.0, 300.0)
    ref = (np.clip(image.astype(np.float64), -100.0, 300.0) + 100.0) / 400.0
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        window(image, 10.0, 10.0)


def test_zscore_over_mask_or_volume():
    rng = np.random.default_rng(1)
    image = rng.normal(40.0, 150.0, size=(6, 10, 12)).astype(np.float32)
    image[:, :3] = -1000.0
    mask = image > BODY_THRESHOLD_HU
    out = zscore(image, mask)
    values = image[mask].astype(np.float64)
    np.testing.assert_allclose(out, (image - values.mean()) / values.std(), rtol=1e-5, atol=1e-5)
    assert abs(out[mask].mean()) < 1e-5 and abs(out[mask].std() - 1.0) < 1e-5
    whole = zscore(image)
    np.testing.assert_allclose(whole, (image - image.astype(np.float64).mean()) / image.astype(np.float64).std(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(zscore(image, np.zeros_like(mask)), whole)  # an empty mask: the whole volume


def test_equalise_histogram_matches_skimage(phantom, monkeypatch):
    image, _ = phantom
    x = window(image, -100.0, 300.0)
    out = equalise_histogram(x)
    monkeypatch.setattr(intensity, "CHUNK_VOXELS", 1000)
    np.testing.assert_array_equal(equalise_histogram(x), out)  # slab by slab = all at once
    ref = exposure.equalize_hist(x, nbins=256).astype(np.float64)
    ref = (ref - ref.min()) / (1.0 - ref.min())  # lowest level to 0: (cdf - cdf_min) / (n - cdf_min)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)
    assert (out[x == 0] == 0).all()  # air (windowed to 0) stays 0: the pad value
    order = np.argsort(x, axis=None)
    assert (np.diff(out.ravel()[order]) >= 0).all()  # monotone


def test_clahe_per_axial_slice_matches_skimage(phantom):
    image, _ = phantom
    x = window(image, -100.0, 400.0)
    for clip, kernel in ((0.01, None), (0.03, 16)):
        out = clahe_slices(x, clip, kernel)
        assert out.dtype == np.float32 and out.min() >= 0.0 and out.max() <= 1.0
        for z in range(x.shape[0]):
            ref = exposure.equalize_adapthist(x[z], kernel_size=kernel, clip_limit=clip, nbins=256)
            np.testing.assert_allclose(out[z], ref, rtol=0, atol=1e-6)
    flat = x.copy()
    flat[0] = 0.0  # an all-air slice stays black
    assert (clahe_slices(flat, 0.01)[0] == 0).all()


# --- order, and the planned path unchanged -------------------------------------------------

def test_apply_options_order(phantom):
    image, _ = phantom
    hu = image.astype(np.float32)
    g = ndimage.gaussian_filter(hu, 1.0, mode="nearest")
    w = (np.clip(g, -100.0, 300.0) + 100.0) / 400.0
    eq = exposure.equalize_hist(w, nbins=256).astype(np.float64)
    ref = (eq - eq.min()) / (1.0 - eq.min())
    opts = {"intensity": "window", "window_hu": [-100, 300], "histogram_equalisation": True, "gaussian_sigma_voxels": 1.0, "base": "x"}
    out = apply_options(image, opts, NORM)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)  # smoothing -> window -> equalisation
    wrong = equalise_histogram(smooth(window(image, -100, 300), 1.0))  # smoothing after the window differs
    assert np.abs(out - wrong).max() > 0.05
    clahe = apply_options(image, {"intensity": "window", "window_hu": [-100, 400], "clahe": {"clip_limit": 0.01}}, NORM)
    np.testing.assert_array_equal(clahe, clahe_slices(window(image, -100, 400), 0.01))
    body = image > BODY_THRESHOLD_HU
    z = apply_options(image, {"intensity": "zscore_image", "gaussian_sigma_voxels": 1.0, "inplane_factor": 2.0}, NORM, body)
    np.testing.assert_allclose(z, (g - g[body].astype(np.float64).mean()) / g[body].astype(np.float64).std(), rtol=0, atol=1e-4)
    assert abs(z[body].mean()) < 1e-4 and abs(z[body].std() - 1) < 1e-4
    for opts in ({}, {"intensity": "ct"}, {"inplane_factor": 2.0, "base": "fullres"}):
        np.testing.assert_array_equal(apply_options(image, opts, NORM), normalise_ct(image, NORM))
    before = image.copy()
    apply_options(image, {"intensity": "zscore_image", "gaussian_sigma_voxels": 1.0}, NORM)
    np.testing.assert_array_equal(image, before)  # pure


def committed_preprocess(image, geometry, label, plans, ident):
    """A frozen copy of the committed planned path: crop, normalise, resample (float16)."""
    box = body_bbox(image, label)
    data = normalise_ct(crop(image, box), plans.normalisation)
    seg = np.ascontiguousarray(crop(label.astype(np.uint8), box))
    target = tuple(float(s) for s in plans.data_spacings[ident])
    shape = new_shape_for(data.shape, geometry.spacing, target)
    order_z = 1 if is_anisotropic(geometry.spacing, target) else 3
    out = data.astype(np.float16) if shape == tuple(data.shape) else resample_to_shape(data, shape, 3, order_z, np.float16, clip_to_input_range=True)
    return out, resample_labels(seg, shape)


def test_planned_path_is_bit_identical_to_the_committed_one(plans, phantom):
    image, label = phantom
    geometry = Geometry(image.shape, (6.0, 5.0, 5.0), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    lits, lits_geometry = read_image(examples.image_path("lits117_128cube"))
    lits_label, _ = read_image(examples.label_path("lits117_128cube"))
    p = replace(plans, normalisation=NORM, data_spacings={**plans.data_spacings, "lowres": (3.0, 2.2, 2.2)})
    for img, geo, lab in ((image, geometry, label), (lits, lits_geometry, lits_label)):
        idents = ["fullres", "lowres", *p.data_preprocessing]  # options folders in between change nothing
        out = {i: (d, s, props) for i, d, s, props in iter_preprocessed(img, geo, lab, p, idents)}
        for ident in ("fullres", "lowres"):
            ref, ref_seg = committed_preprocess(img, geo, lab, p, ident)
            data, seg, props = out[ident]
            assert data.dtype == ref.dtype == np.float16
            np.testing.assert_array_equal(data.view(np.uint16), ref.view(np.uint16))
            np.testing.assert_array_equal(seg, ref_seg)
            assert props["preprocessing"] == {} and props["pad_value"] == air_pad_value(NORM)


def test_pad_values(plans):
    air = air_pad_value(plans.normalisation)
    assert pad_value_for(plans, "fullres") == air
    assert pad_value_for(plans, ident_of(plans, "mixpool_cascade_liver")) == 0.0
    assert pad_value_for(plans, ident_of(plans, "unet2d_clahe")) == 0.0
    dual = ident_of(plans, "dualpath3d")
    assert pad_value_for(plans, dual) == ZSCORE_PAD_FALLBACK and pad_value_for(plans, dual, -6.25) == -6.25
    p = replace(plans, data_preprocessing={"w": {"intensity": "window", "window_hu": [-1100, 0]}, "s": {"gaussian_sigma_voxels": 1.0},
                                           "v": {"intensity": "window", "window_hu": [-100, 300]}})
    assert pad_value_for(p, "w") == float(np.float16(100 / 1100)) and pad_value_for(p, "s") == air and pad_value_for(p, "v") == 0.0


# --- the recipes' data folders end to end --------------------------------------------------

@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory, plans):
    root = tmp_path_factory.mktemp("options")
    raw = write_phantom_dataset(root / "raw", 2, np.random.default_rng(7), shape=SHAPE, spacing=SPACING, dataset_name="Dataset901_Options", vary=0.0)
    dataset = open_dataset(raw)
    out = root / "preprocessed" / "Dataset901_Options"
    out.mkdir(parents=True)
    (out / "plans.json").write_text(json.dumps(plans.to_json()))
    summary = preprocess_dataset(dataset, plans, out, progress=False)
    return dataset, out, summary


def original(dataset, case_id):
    case = next(c for c in dataset.training if c.case_id == case_id)
    image, geometry = read_image(case.images[0])
    label, _ = read_image(case.label)
    return image, geometry, label


def test_recipe_folders_exist_with_their_options(plans, preprocessed):
    dataset, out, summary = preprocessed
    assert summary["data_identifiers"] == sorted(plans.data_spacings) and len(summary["done"]) == 2
    for ident in plans.data_spacings:
        assert list_cases(out / ident) == ["phantom_000", "phantom_001"]
        dp = json.loads((out / ident / DATASET_PROPERTIES).read_text())
        options = plans.data_preprocessing.get(ident, {})
        assert dp["preprocessing"] == options and dp["preprocessing_hash"] == intensity.options_hash(options)
        assert dp["spacing"] == list(plans.data_spacings[ident])
        props = load_properties(out / ident, "phantom_000")
        assert props["preprocessing"] == options and props["preprocessing_hash"] == dp["preprocessing_hash"]
        assert folder_pad_value(out / ident) == dp["pad_value"] == pad_value_for(plans, ident, dp["pad_value"])
    assert len(plans.data_preprocessing) == 3


@pytest.mark.parametrize("configuration", ["mixpool_cascade_liver", "unet2d_clahe"])
def test_windowed_folders_lie_in_0_1_and_map_back_exactly(plans, preprocessed, configuration):
    dataset, out, _ = preprocessed
    ident = ident_of(plans, configuration)
    assert plans.data_spacings[ident] == SPACING  # the phantoms' own spacing: resampling is exact
    for case_id in ("phantom_000", "phantom_001"):
        data, seg, props = load_case(out / ident, case_id, mmap=False)
        image, geometry, label = original(dataset, case_id)
        d = data.astype(np.float32)
        assert data.dtype == np.float16 and d.min() == 0.0 and d.max() == 1.0 and props["pad_value"] == 0.0
        cropped = crop(image, props["crop_box"]).astype(np.float32)
        assert data.shape == cropped.shape
        w = (np.clip(cropped, -100.0, 300.0) + 100.0) / 400.0
        if configuration.startswith("mixpool"):  # window [-100, 300] HU, then equalisation over the volume
            eq = exposure.equalize_hist(w, nbins=256).astype(np.float64)
            ref = (eq - eq.min()) / (1.0 - eq.min())
            np.testing.assert_allclose(d, ref, rtol=0, atol=1e-3)  # float16 storage
            assert (d[cropped <= -100] == 0).all()
        else:  # window [-100, 400] HU, then CLAHE on each axial slice
            w = (np.clip(cropped, -100.0, 400.0) + 100.0) / 500.0
            ref = np.stack([exposure.equalize_adapthist(s, clip_limit=0.01, nbins=256) for s in w])
            np.testing.assert_allclose(d, ref, rtol=0, atol=1e-3)
        back = map_back(seg, props)
        assert back.shape == geometry.shape == tuple(Geometry.from_json(props["geometry"]).shape)
        np.testing.assert_array_equal(back, label)


def test_dualpath_folder_zscore_half_inplane_and_map_back(plans, preprocessed):
    dataset, out, _ = preprocessed
    ident = ident_of(plans, "dualpath3d")
    assert plans.data_spacings[ident] == (SPACING[0], 2 * SPACING[1], 2 * SPACING[2])
    pads = []
    for case_id in ("phantom_000", "phantom_001"):
        data, seg, props = load_case(out / ident, case_id, mmap=False)
        full, _, full_props = load_case(out / "fullres", case_id, mmap=False)
        image, geometry, label = original(dataset, case_id)
        assert props["crop_box"] == full_props["crop_box"] and props["shape_after_crop"] == list(full.shape)
        assert data.shape == (full.shape[0], round(full.shape[1] / 2), round(full.shape[2] / 2)) == tuple(props["shape_after_resampling"])
        hu = resample_hu(crop(image, props["crop_box"]), geometry.spacing, props["spacing"])
        body = hu > BODY_THRESHOLD_HU
        d = data.astype(np.float64)
        assert abs(d[body].mean()) < 0.01 and abs(d[body].std() - 1.0) < 0.01  # per-image z-score over the body
        assert props["pad_value"] == float(data.min()) < -3
        pads.append(props["pad_value"])
        back = map_back(seg, props)
        assert back.shape == geometry.shape
        assert dice(back > 0, label > 0) >= 0.95 and dice(back == 1, label == 1) >= 0.95
        probs = map_back_probabilities(np.stack([seg == c for c in range(3)]).astype(np.float32), props)
        assert probs.shape == (3,) + geometry.shape
    dp = json.loads((out / ident / DATASET_PROPERTIES).read_text())
    assert dp["pad_value"] == min(pads) == folder_pad_value(out / ident)


def test_changed_options_force_recomputation(plans, preprocessed, tmp_path):
    dataset, out, _ = preprocessed
    again = preprocess_dataset(dataset, plans, out, progress=False)
    assert again["done"] == [] and len(again["skipped"]) == 2
    ident = ident_of(plans, "unet2d_clahe")
    path = out / ident / "phantom_001.json"
    props = json.loads(path.read_text())
    path.write_text(json.dumps(dict(props, preprocessing_hash="0" * 64)))  # made with other options, same plans hash
    redo = preprocess_dataset(dataset, plans, out, [ident], progress=False)
    assert redo["done"] == ["phantom_001"]
    assert json.loads(path.read_text())["preprocessing_hash"] == props["preprocessing_hash"]
    # other options under the same identifier: every case of that folder is redone, with them
    options = {**plans.data_preprocessing[ident], "clahe": {"clip_limit": 0.02}}
    changed = replace(plans, data_preprocessing={**plans.data_preprocessing, ident: options})
    redo = preprocess_dataset(dataset, changed, out, [ident], progress=False)
    assert redo["done"] == ["phantom_000", "phantom_001"]
    assert load_properties(out / ident, "phantom_000")["preprocessing"]["clahe"] == {"clip_limit": 0.02}
    preprocess_dataset(dataset, plans, out, [ident], progress=False)  # back as the other tests expect


def test_preprocess_case_matches_the_runner(plans, preprocessed):
    dataset, out, _ = preprocessed
    image, geometry, label = original(dataset, "phantom_000")
    from autoliver.preprocess.runner import case_seed

    for ident in plans.data_preprocessing:
        data, seg, props = preprocess_case(image, geometry, label, plans, ident, seed=case_seed("phantom_000"))
        stored, stored_seg, _ = load_case(out / ident, "phantom_000", mmap=False)
        np.testing.assert_array_equal(data, stored)
        np.testing.assert_array_equal(seg, stored_seg)
