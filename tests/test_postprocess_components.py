"""Label-only post-processing against brute-force references (scipy on the whole volume),
apply_postprocessing's contract, and the folder wrapper."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from autoliver.core.artefacts import InferencePlan, parse_steps
from autoliver.core.errors import MissingArtefactError
from autoliver.evaluate.case_report import case_report
from autoliver.infer.postprocess_folder import postprocess_folder
from autoliver.io.atomic import write_json
from autoliver.io.images import Geometry, read_image, write_image
from autoliver.io.inference_plan import write_inference_plan
from autoliver.postprocess import apply_postprocessing, largest_component, largest_liver_component, min_tumour_volume, tumour_inside_liver

S26 = np.ones((3, 3, 3), dtype=bool)


def random_labels(rng: np.random.Generator, shape=(14, 20, 18), p_liver=0.35, p_tumour=0.12) -> np.ndarray:
    """Blobby random label maps: smoothed noise thresholded, tumour inside and outside liver."""
    liver = ndimage.uniform_filter(rng.random(shape), 3) > 1 - p_liver * 0.6
    tumour = ndimage.uniform_filter(rng.random(shape), 2) > 1 - p_tumour * 0.5
    seg = np.zeros(shape, np.uint8)
    seg[liver] = 1
    seg[tumour] = 2
    return seg


def ref_largest(mask: np.ndarray) -> np.ndarray:
    comps, n = ndimage.label(mask, structure=S26)
    if n == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(comps.ravel())
    sizes[0] = 0
    return comps == np.argmax(sizes)


@pytest.mark.parametrize("seed", range(6))
def test_largest_component_matches_scipy_label(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((12, 17, 15)) > rng.uniform(0.55, 0.8)
    got = largest_component(mask)
    np.testing.assert_array_equal(got, ref_largest(mask))
    # the kept component is one 26-connected piece, and no other component is larger
    assert ndimage.label(got, structure=S26)[1] == (1 if mask.any() else 0)
    assert not largest_component(np.zeros((3, 4, 5), bool)).any()


@pytest.mark.parametrize("seed", range(4))
def test_largest_liver_component_matches_reference(seed):
    seg = random_labels(np.random.default_rng(seed))
    ref = seg.copy()
    ref[~ref_largest(ref > 0)] = 0
    got = largest_liver_component(seg)
    np.testing.assert_array_equal(got, ref)
    ref2 = ref.copy()
    liver = ref2 == 1
    ref2[liver & ~ref_largest(liver)] = 0
    np.testing.assert_array_equal(largest_liver_component(seg, then_liver=True), ref2)
    assert set(np.unique(got)) <= set(np.unique(seg))


def ref_tumour_inside(seg, spacing, d):
    out = seg.copy()
    comps, n = ndimage.label(seg == 2, structure=S26)
    liver = seg == 1
    dist = ndimage.distance_transform_edt(~liver, sampling=spacing) if liver.any() else np.full(seg.shape, np.inf)
    for k in range(1, n + 1):
        if dist[comps == k].min() > d + 1e-6:
            out[comps == k] = 0
    return out


@pytest.mark.parametrize("seed", range(6))
def test_tumour_inside_liver_matches_whole_volume_distance(seed):
    rng = np.random.default_rng(100 + seed)
    seg = random_labels(rng, p_liver=0.25)
    spacing = (2.5, 0.8, 1.1)
    for d in (0.0, 1.0, 3.0, 8.0):
        np.testing.assert_array_equal(tumour_inside_liver(seg, spacing, d), ref_tumour_inside(seg, spacing, d))


def test_tumour_inside_liver_keeps_a_large_tumour_core_and_drops_a_distant_one():
    seg = np.zeros((20, 40, 40), np.uint8)
    seg[2:18, 2:30, 2:30] = 1
    seg[4:16, 5:27, 5:27] = 2  # large tumour: its core is > 10 mm from any liver voxel
    seg[8:10, 34:38, 34:38] = 2  # outside the liver, 4+ voxels away
    out = tumour_inside_liver(seg, (1.0, 1.0, 1.0), dilation_mm=2.0)
    assert (out[4:16, 5:27, 5:27] == 2).all()
    assert (out[8:10, 34:38, 34:38] == 0).all()
    # with no liver at all every tumour goes
    assert not (tumour_inside_liver(np.where(seg == 2, 2, 0).astype(np.uint8), (1, 1, 1), 5.0) == 2).any()
    # a generous dilation reaches the distant blob (5 voxels at 1 mm, then 10 mm)
    assert (tumour_inside_liver(seg, (1.0, 1.0, 1.0), dilation_mm=10.0) == seg).all()


def ref_min_volume(seg, spacing, vmin):
    out = seg.copy()
    comps, n = ndimage.label(seg == 2, structure=S26)
    vox = float(np.prod(spacing))
    for k in range(1, n + 1):
        own = comps == k
        if own.sum() * vox < vmin:
            ring = ndimage.binary_dilation(own, structure=S26) & ~own
            out[own] = 1 if (seg[ring] == 1).any() else 0
    return out


@pytest.mark.parametrize("seed", range(5))
def test_min_tumour_volume_matches_reference(seed):
    seg = random_labels(np.random.default_rng(200 + seed))
    spacing = (2.0, 0.7, 0.7)
    for vmin in (0.0, 3.0, 10.0, 50.0, 1e9):
        got = min_tumour_volume(seg, spacing, vmin)
        np.testing.assert_array_equal(got, ref_min_volume(seg, spacing, vmin))
    assert not (min_tumour_volume(seg, spacing, 1e9) == 2).any()


def test_steps_do_not_modify_their_input_and_reject_bad_arguments():
    seg = random_labels(np.random.default_rng(7))
    before = seg.copy()
    largest_liver_component(seg, True)
    tumour_inside_liver(seg, (1, 1, 1), 2.0)
    min_tumour_volume(seg, (1, 1, 1), 5.0)
    np.testing.assert_array_equal(seg, before)
    with pytest.raises(ValueError, match="spacing"):
        tumour_inside_liver(seg, (1, 0, 1), 2.0)
    with pytest.raises(ValueError, match="dilation_mm"):
        tumour_inside_liver(seg, (1, 1, 1), -1.0)
    with pytest.raises(ValueError, match=r"\(Z, Y, X\)"):
        min_tumour_volume(seg[0], (1, 1, 1), 5.0)


STEPS = [
    {"name": "dense_crf", "enabled": False, "params": {}},
    {"name": "largest_liver_component", "enabled": True, "params": {}},
    {"name": "tumour_inside_liver", "enabled": True, "params": {"dilation_mm": 2.0}},
    {"name": "min_tumour_volume", "enabled": False, "params": {"min_volume_mm3": 1e9}},
]


def test_apply_postprocessing_runs_enabled_steps_in_order():
    seg = random_labels(np.random.default_rng(3))
    spacing = (2.0, 1.0, 1.0)
    expected = tumour_inside_liver(largest_liver_component(seg), spacing, 2.0)
    got = apply_postprocessing(seg, spacing, STEPS)
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.uint8 and got is not seg
    # nothing enabled: an equal copy
    np.testing.assert_array_equal(apply_postprocessing(seg, spacing, [dict(s, enabled=False) for s in STEPS]), seg)


def test_apply_postprocessing_errors():
    seg = random_labels(np.random.default_rng(4))
    crf_on = [{"name": "dense_crf", "enabled": True, "params": {}}]
    with pytest.raises(ValueError, match="missing: probabilities, image"):
        apply_postprocessing(seg, (1, 1, 1), crf_on)
    with pytest.raises(ValueError, match="must come before"):
        apply_postprocessing(seg, (1, 1, 1), [STEPS[1]] + crf_on)
    with pytest.raises(ValueError, match="one of"):
        apply_postprocessing(seg, (1, 1, 1), [{"name": "open_holes", "enabled": True}])


def write_plan(path, steps):
    plan = InferencePlan(dataset="Dataset001_T", plans_hash="x", configurations=("3d_fullres",), folds={"3d_fullres": ("0",)},
                         postprocessing=parse_steps(steps))
    return write_inference_plan(path, plan)


def test_postprocess_folder_writes_geometry_and_updated_report(tmp_path):
    seg = np.zeros((10, 30, 30), np.uint8)
    seg[2:8, 5:20, 5:20] = 1
    seg[3:6, 8:12, 8:12] = 2
    seg[4:6, 25:28, 25:28] = 2  # tumour outside the liver: a separate component, removed
    geometry = Geometry(seg.shape, (3.0, 0.9, 0.9), (10.0, -5.0, 2.0), (1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    src, out = tmp_path / "pred", tmp_path / "post"
    write_image(src / "case_a.nii.gz", seg, geometry)
    old = case_report(seg, geometry, configuration="3d_fullres", folds=["0"], timings={"predict_s": 1.0}, extra={"case": "case_a"})
    write_json(src / "case_a.json", old)
    write_image(src / "case_b.nii.gz", seg, geometry)  # no report: none written
    plan = write_plan(tmp_path / "inference_plan.json", STEPS)
    summary = postprocess_folder(src, out, plan, progress=False)
    assert summary.processed == ["case_a", "case_b"]
    new, geo = read_image(out / "case_a.nii.gz")
    assert geo == read_image(src / "case_a.nii.gz")[1]
    np.testing.assert_array_equal(new, apply_postprocessing(seg, geometry.spacing, STEPS))
    report = json.loads((out / "case_a.json").read_text())
    assert old["tumour_count"] == 2 and report["tumour_count"] == 1
    assert report["case"] == "case_a" and report["postprocessing"] == ["largest_liver_component", "tumour_inside_liver"]
    assert "postprocess_s" in report["runtime_s"] and report["runtime_s"]["predict_s"] == 1.0
    assert not (out / "case_b.json").exists()
    assert postprocess_folder(src, out, plan, progress=False).skipped == ["case_a", "case_b"]
    # a plan with the CRF on needs the probabilities beside the label maps
    crf_plan = write_plan(tmp_path / "crf_plan.json", [{"name": "dense_crf", "enabled": True, "params": {}}])
    with pytest.raises(MissingArtefactError, match="--save-probabilities"):
        postprocess_folder(src, tmp_path / "crf", crf_plan, progress=False)
