"""Model selection and post-processing decisions on hand-made cross-validation folders whose
best answer is known."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from autoliver.core.errors import MissingArtefactError, PlanError
from autoliver.evaluate.overlap import case_dice
from autoliver.io.atomic import write_json
from autoliver.preprocess.storage import save_case
from autoliver.selection import find_best_configuration, load_inference_plan
from autoliver.selection.cv import discover, load_probabilities
from autoliver.selection.ensemble import choose, rank
from planning.plans import Configuration, Normalisation, Plans

DATASET = "Dataset001_Sel"
SHAPE, LOW_SHAPE = (10, 24, 24), (5, 12, 12)
SPACING, LOW_SPACING = (2.0, 1.0, 1.0), (4.0, 2.0, 2.0)
CASES = [f"case_{i}" for i in range(5)]
R_A = (slice(2, 8), slice(4, 8), slice(4, 18))  # liver voxels 3d_fullres is unsure about


def config(name: str, dims: int, data_identifier: str = "fullres") -> Configuration:
    spacing = LOW_SPACING if data_identifier == "lowres" else SPACING
    return Configuration(name=name, network_dims=dims, data_identifier=data_identifier, spacing=spacing, median_shape=SHAPE,
                         patch_size=(16, 16) if dims == 2 else (8, 16, 16), batch_size=2, n_stages=2, features_per_stage=(4, 8),
                         kernel_sizes=((3,) * dims,) * 2, strides=((1,) * dims, (2,) * dims))


def make_plans() -> Plans:
    configs = {c.name: c for c in (config("2d", 2), config("2.5d", 2), config("3d_fullres", 3), config("3d_lowres", 3, "lowres"))}
    return Plans(dataset_name=DATASET, fingerprint_hash="f", device="cpu", memory_budget_gb=8.0,
                 labels={"background": 0, "liver": 1, "tumour": 2}, normalisation=Normalisation("ct", -100.0, 200.0, 50.0, 50.0),
                 data_spacings={"fullres": SPACING, "lowres": LOW_SPACING}, configurations=configs)


def reference(i: int) -> np.ndarray:
    seg = np.zeros(SHAPE, np.uint8)
    seg[2:8, 4:18, 4:18] = 1
    if i != 4:  # case_4 has no tumour (LiTS rule)
        seg[4:6, 8 + i:12 + i, 8:12] = 2  # 32 voxels = 64 mm3
    return seg


def one_hot(seg: np.ndarray) -> np.ndarray:
    return np.stack([(seg == c) for c in range(3)]).astype(np.float32)


def set_probs(p: np.ndarray, where, values) -> None:
    for c, v in enumerate(values):
        p[c][where] = v


def predictions(i: int) -> dict[str, np.ndarray]:
    """3d_fullres is unsure in R_A (wrongly), 2d is unsure on the tumour (wrongly), 2.5d is
    confidently wrong everywhere: only their pair 3d_fullres+2d gets every voxel right, except
    the artefacts both share (a far liver blob in case_0, an unsure tumour speck in case_4)."""
    ref = reference(i)
    a, b = one_hot(ref), one_hot(ref)
    set_probs(a, R_A, (0.55, 0.45, 0.0))
    set_probs(b, ref == 2, (0.0, 0.55, 0.45))
    for p in (a, b):
        if i == 0:
            set_probs(p, (slice(0, 2), slice(20, 23), slice(20, 23)), (0.0, 1.0, 0.0))
        if i == 4:
            set_probs(p, (5, 14, 14), (0.0, 0.4, 0.6))
    c = np.zeros_like(a)
    c[0] = 1.0
    return {"3d_fullres": a, "2d": b, "2.5d": c}


@pytest.fixture()
def cv_ws(tmp_path):
    plans = make_plans()
    pre, res = tmp_path / "preprocessed" / DATASET, tmp_path / "results" / DATASET
    write_json(pre / "plans.json", plans.to_json())
    rng = np.random.default_rng(0)
    for i, case in enumerate(CASES):
        save_case(pre / "fullres", case, rng.normal(size=SHAPE).astype(np.float16), reference(i), {"spacing": list(SPACING)})
    splits = [{"train": [c for c in CASES if c != v], "val": [v]} for v in CASES]
    write_json(res / "splits.json", splits)
    for k, case in enumerate(CASES):
        for name, probs in predictions(k).items():
            fold = res / name / f"fold_{k}"
            (fold / "validation").mkdir(parents=True)
            np.savez_compressed(fold / "validation" / f"{case}.npz", probabilities=probs.astype(np.float16))
            write_json(fold / "metrics.json", {"plans_hash": plans.plans_hash, "fold": k})
    return pre, res


@pytest.fixture()
def no_crf(monkeypatch):
    monkeypatch.setitem(sys.modules, "autoliver.postprocess.crf", None)  # import raises ImportError


def brute_force_mean(res, members) -> dict[str, float]:
    per = []
    for k, case in enumerate(CASES):
        probs = [np.load(res / m / f"fold_{k}" / "validation" / f"{case}.npz")["probabilities"].astype(np.float32) for m in members]
        per.append(case_dice((sum(probs) / len(probs)).argmax(0), reference(k)))
    return {n: float(np.mean([d[n] for d in per])) for n in ("liver", "tumour")}


def test_the_known_best_ensemble_wins_and_scores_match_brute_force(cv_ws, no_crf):
    pre, res = cv_ws
    result = find_best_configuration(pre, res, progress=False)
    assert result.chosen == "3d_fullres+2d"
    assert result.plan.configurations == ("3d_fullres", "2d")
    assert result.plan.folds == {"3d_fullres": ("0", "1", "2", "3", "4"), "2d": ("0", "1", "2", "3", "4")}
    assert len(result.ranking) == 7  # 3 singles, 3 pairs, 1 triple
    assert result.ranking[0]["candidate"] == "3d_fullres+2d"
    for row in result.ranking:
        expected = brute_force_mean(res, row["configurations"])
        assert row["liver"] == pytest.approx(expected["liver"], abs=1e-12)
        assert row["tumour"] == pytest.approx(expected["tumour"], abs=1e-12)
    assert "3d_fullres+2d" in result.table() and result.table().splitlines()[1].startswith("*")
    # the plan on disk round-trips
    plan = load_inference_plan(res / "inference_plan.json")
    assert plan == result.plan and plan.plans_hash == make_plans().selection_hash(plan.configurations)


def test_postprocessing_decisions_without_crf(cv_ws, no_crf):
    pre, res = cv_ws
    steps = {s.name: s.to_json() for s in find_best_configuration(pre, res, progress=False).plan.postprocessing}
    assert [s for s in steps] == ["dense_crf", "largest_liver_component", "tumour_inside_liver", "min_tumour_volume"]
    assert steps["dense_crf"]["enabled"] is False and "not available" in steps["dense_crf"]["note"]
    lcc = steps["largest_liver_component"]
    assert lcc["enabled"] and lcc["params"] == {"then_liver": False}  # both variants tie: the milder one
    assert lcc["cv"]["after"]["liver"] > lcc["cv"]["before"]["liver"]
    assert steps["tumour_inside_liver"]["enabled"] is False  # nothing left outside the liver
    mtv = steps["min_tumour_volume"]
    # the 2 mm3 speck goes (case_4's tumour Dice 0 -> 1), the 64 mm3 tumours stay: 10 and 50 tie, 10 is milder
    assert mtv["enabled"] and mtv["params"] == {"min_volume_mm3": 10.0}
    assert mtv["cv"]["before"]["tumour"] == pytest.approx(0.8) and mtv["cv"]["after"]["tumour"] == pytest.approx(1.0)
    strong = {v["params"]["min_volume_mm3"]: v for v in mtv["cv"]["variants"]}
    assert strong[100.0]["tumour"] < mtv["cv"]["before"]["tumour"]  # removes the real tumours


def fake_crf_module() -> types.ModuleType:
    """A stand-in CRF: zero the tumour probability below ``thr`` (renormalised)."""
    module = types.ModuleType("autoliver.postprocess.crf")

    def dense_crf(probabilities, image, spacing, thr=0.0, roi="liver"):  # the contract's signature
        assert probabilities.shape[1:] == image.shape and probabilities.dtype == np.float32 and len(spacing) == 3
        out = probabilities.copy()
        out[2][out[2] < thr] = 0.0
        return out / out.sum(0, keepdims=True)

    module.dense_crf = dense_crf
    module.CRF_PARAM_GRID = [{"thr": 0.0}, {"thr": 0.65}, {"thr": 0.8}]
    return module


def test_crf_decided_on_cv_with_a_stand_in_module(cv_ws, monkeypatch):
    monkeypatch.setitem(sys.modules, "autoliver.postprocess.crf", fake_crf_module())
    pre, res = cv_ws
    steps = {s.name: s.to_json() for s in find_best_configuration(pre, res, progress=False).plan.postprocessing}
    crf = steps["dense_crf"]
    assert crf["enabled"] and crf["params"] == {"thr": 0.65}  # removes the 0.6 speck, keeps the 0.725 tumours
    assert [v["params"]["thr"] for v in crf["cv"]["variants"]] == [0.0, 0.65, 0.8]
    assert crf["cv"]["seconds_per_case"] >= 0
    assert steps["min_tumour_volume"]["enabled"] is False  # the CRF already removed the speck
    assert steps["largest_liver_component"]["enabled"] is True


def strip_timings(d: dict) -> dict:
    d = dict(d, created=None)
    d["postprocessing"] = [dict(s, cv=dict(s["cv"], seconds_per_case=None) if s["cv"] else None) for s in d["postprocessing"]]
    return d


def test_decisions_are_reproducible(cv_ws, no_crf):
    pre, res = cv_ws
    first = json.loads((find_best_configuration(pre, res, progress=False).path).read_text())
    second = json.loads((find_best_configuration(pre, res, progress=False).path).read_text())
    assert strip_timings(first) == strip_timings(second)


def test_missing_fold_names_the_command_and_one_configuration_works(cv_ws, no_crf):
    pre, res = cv_ws
    (res / "2d" / "fold_3" / "metrics.json").unlink()
    result = find_best_configuration(pre, res, progress=False)
    assert f"`autoliver train -d {DATASET} 2d 3`" in result.skipped["2d"]
    assert "2d" not in result.plan.configurations and result.plan.evidence["left_out"] == result.skipped
    with pytest.raises(MissingArtefactError, match=f"autoliver train -d {DATASET} 2d 3"):
        find_best_configuration(pre, res, configurations=["2d", "3d_fullres"], progress=False)
    single = find_best_configuration(pre, res, configurations=["3d_fullres"], progress=False, write=False)
    assert single.plan.configurations == ("3d_fullres",) and len(single.ranking) == 1
    (res / "3d_fullres" / "fold_1" / "validation" / "case_1.npz").unlink()
    with pytest.raises(MissingArtefactError, match="3d_fullres fold 1: 1 validation probabilities missing"):
        find_best_configuration(pre, res, configurations=["3d_fullres"], progress=False)
    with pytest.raises(PlanError, match="not in"):
        find_best_configuration(pre, res, configurations=["3d_cascade_fullres"], progress=False)


def test_lowres_probabilities_are_resampled_to_the_scoring_grid(cv_ws):
    pre, res = cv_ws
    for k, case in enumerate(CASES):
        fold = res / "3d_lowres" / f"fold_{k}"
        (fold / "validation").mkdir(parents=True)
        low = one_hot(reference(k)[::2, ::2, ::2])
        np.savez_compressed(fold / "validation" / f"{case}.npz", probabilities=low.astype(np.float16))
        write_json(fold / "metrics.json", {"plans_hash": make_plans().plans_hash})
    source = discover(pre, res)
    assert "3d_lowres" in source.configurations
    probs = load_probabilities(source, "3d_lowres", "case_2", SHAPE)
    assert probs.shape == (3, *SHAPE) and np.allclose(probs.sum(0), 1.0, atol=1e-3)
    assert case_dice(probs.argmax(0), reference(2))["liver"] > 0.8


def test_choose_prefers_fewer_models_within_the_tolerance():
    rows = rank({"2d": {"c": {"liver": 0.9, "tumour": 0.5}},
                 "3d_fullres": {"c": {"liver": 0.9, "tumour": 0.5}},
                 "3d_fullres+2d": {"c": {"liver": 0.9, "tumour": 0.50005}}}, ["3d_fullres", "2d"])
    assert rows[0]["candidate"] == "3d_fullres+2d" and rows[1]["candidate"] == "3d_fullres"  # preference order breaks ties
    assert choose(rows)["candidate"] == "3d_fullres"
    assert choose(rows, tolerance=0.0)["candidate"] == "3d_fullres+2d"


def test_a_malformed_plan_names_the_file_and_the_command(tmp_path):
    path = tmp_path / "inference_plan.json"
    path.write_text(json.dumps({"schema_version": 1, "dataset": DATASET, "plans_hash": "x", "configurations": ["../3d_huge"],
                                "folds": {}, "postprocessing": []}))
    with pytest.raises(PlanError, match=rf"{path}.*configuration '../3d_huge' is not a plain name.*find_best_configuration -d {DATASET}"):
        load_inference_plan(path)
    with pytest.raises(MissingArtefactError, match="find_best_configuration"):
        load_inference_plan(tmp_path / "none.json")


def test_cli_find_best_configuration_then_postprocess(cv_ws, no_crf, capsys):
    from autoliver.cli import main
    from autoliver.io.images import Geometry, read_image, write_image

    pre, res = cv_ws
    ws = pre.parent.parent
    assert main(["--workspace", str(ws), "find_best_configuration", "-d", DATASET, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "*  1  3d_fullres+2d" in printed and "min_tumour_volume" in printed and str(res / "inference_plan.json") in printed
    seg = reference(4)
    seg[5, 14, 14] = 2
    seg[0:2, 20:23, 20:23] = 1
    write_image(ws / "pred" / "case_4.nii.gz", seg, Geometry(SHAPE, SPACING, (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)))
    assert main(["postprocess", "-i", str(ws / "pred"), "-o", str(ws / "post"), "-p", str(res), "--no-progress"]) == 0
    np.testing.assert_array_equal(read_image(ws / "post" / "case_4.nii.gz")[0], reference(4))
    assert main(["--workspace", str(ws), "find_best_configuration", "-d", DATASET, "-c", "3d_lowres"]) == 1  # nothing trained
