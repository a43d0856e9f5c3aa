"""Every recipe end to end on phantoms: its configurations are added to a planned dataset, their
data folders preprocessed, a few training iterations run, and prediction writes a label map in
exactly the input's geometry; ``autoliver compare`` scores and measures them side by side."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import DATASET, build_tiny_workspace

from autoliver import api
from autoliver.core.layout import Workspace
from autoliver.infer.runner import PredictOptions
from autoliver.io.images import read_image
from autoliver.selection.compare import CompareOptions, compare_configurations, table
from autoliver.train.options import TrainOptions
from autoliver.train.setup import train_fold
from planning.plans import Plans
from planning.recipes import RECIPES

pytestmark = pytest.mark.slow
TINY = {"network_options": {"base_features": 4}}
FAST = TrainOptions(epochs=1, iters_per_epoch=2, val_iters=1, n_workers=0, device="cpu", progress=False, threads=1)
NO_VALIDATION = TrainOptions(epochs=1, iters_per_epoch=2, val_iters=1, n_workers=0, device="cpu", progress=False, threads=1,
                             final_validation=False)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    ws = build_tiny_workspace(tmp_path_factory.mktemp("recipes") / "ws", n_cases=3, shape=(12, 40, 40), lowres=False)
    for name in RECIPES:
        fixed = RECIPES[name].variants[0].patch_size
        overrides = {**TINY, "patch_size": [32, 32]} if fixed else TINY
        api.add_configuration(DATASET, ws, [name], overrides, api.StageOptions(progress=False))
    return ws


def test_recipes_are_added_with_their_own_data_folders(ws):
    plans = Plans.load(ws.dataset(DATASET).plans)
    for name, recipe in RECIPES.items():
        for cname in recipe.configuration_names:
            c = plans.configurations[cname]
            assert c.recipe == name and c.network == recipe.variants[0].network
            assert (ws.dataset(DATASET).data(c.data_identifier) / "dataset_properties.json").is_file()
    assert plans.configurations["dualpath3d"].spacing[1] == 2 * plans.configurations["3d_fullres"].spacing[1]
    # adding recipes leaves the planned configurations' hashes alone (their trained folds stay valid)
    assert plans.configuration_hash("2d") == Plans.load(ws.dataset(DATASET).plans).configuration_hash("2d")


@pytest.mark.parametrize("config", [c for r in RECIPES.values() for c in r.configuration_names])
def test_each_recipe_configuration_trains_and_predicts_in_the_input_geometry(ws, config, tmp_path):
    plans = Plans.load(ws.dataset(DATASET).plans)
    liver = plans.configurations[config].liver_stage
    if liver and not ws.dataset(DATASET).model.fold(liver, 0).final.is_file():  # a tumour stage predicts after its liver stage
        train_fold(ws.dataset(DATASET), liver, 0, NO_VALIDATION)
    result = train_fold(ws.dataset(DATASET), config, 0, NO_VALIDATION)
    assert np.isfinite(result.history[-1]["train_loss"])
    image = sorted((ws.raw / DATASET / "imagesTr").glob("*_0000.nii.gz"))[0]
    summary = api.predict(image, tmp_path / "out", ws, dataset_spec=DATASET, configuration=config, folds=["0"], device="cpu",
                          options=PredictOptions(tta=False, progress=False, roi=False))
    assert not summary.failed
    case = image.name[: -len("_0000.nii.gz")]
    seg, geometry = read_image(tmp_path / "out" / f"{case}.nii.gz")
    _, source = read_image(image)
    assert geometry == source and seg.dtype == np.uint8 and set(np.unique(seg)) <= {0, 1, 2}
    report = json.loads((tmp_path / "out" / f"{case}.json").read_text())
    assert config in json.dumps(report["configuration"])
    if liver:  # the two-stage design ran: both stages' folds are recorded
        assert liver in json.dumps(report)


def test_compare_scores_and_measures_every_configuration(ws):
    configs = ["2d", "resnet50_unet", "unet2d_clahe"]
    calls = []

    def train(paths, configuration, fold, options):
        calls.append((configuration, fold, options.budget_minutes))
        train_fold(paths, configuration, fold, FAST)
        return 0.5

    options = CompareOptions(budget_minutes=0.2, folds=(1,), isolate=False, progress=False)  # fold 1: not trained above
    result = compare_configurations(ws.dataset(DATASET), configs, options, train=train)
    assert calls == [(c, 1, 0.2) for c in configs]  # the same budget and fold for each
    rows = {r["configuration"]: r for r in result["rows"]}
    assert set(rows) == set(configs)
    for r in rows.values():
        assert 0 <= r["liver_dice"] <= 1 and r["parameters"] > 0 and r["gflops_per_patch"] > 0
        assert r["train_samples_per_s"] > 0 and r["inference_s_per_case"] > 0 and r["peak_memory_gib"] == 0.5
        assert r["cases"] == len(result["per_case"][r["configuration"]]) >= 1
    out = ws.dataset(DATASET).model.root / "compare"
    assert (out / "compare.csv").read_text().count("\n") == len(configs) + 1
    assert "| resnet50_unet |" in table(result)
    again = compare_configurations(ws.dataset(DATASET), configs, options, train=train)  # resumes: nothing trained again
    assert len(calls) == len(configs) and [r["liver_dice"] for r in again["rows"]] == [r["liver_dice"] for r in result["rows"]]
    from autoliver.report.compare_page import render_compare

    page = render_compare(result)
    assert "resnet50_unet" in page and "<script" not in page and "data:image/png;base64," in page


def test_configuration_training_options_reach_the_trainer(ws):
    from autoliver.io.checkpoint import load_checkpoint

    paths = ws.dataset(DATASET)
    fold = paths.model.fold("unet2d_clahe", 2)
    if not fold.final.is_file():
        train_fold(paths, "unet2d_clahe", 2, NO_VALIDATION)
    state = load_checkpoint(fold.final, map_location="cpu")
    assert "exp_avg" in next(iter(state["optimiser"]["state"].values()))  # Adam, as the recipe says
    assert state["optimiser"]["param_groups"][0]["lr"] == pytest.approx(1e-3)  # plateau schedule: the recipe's lr, not poly
    assert state["plateau"]["best"] is not None and state["history"][-1]["plateau"] == state["plateau"]


def test_tumour_stage_validates_as_a_two_stage_design(ws):
    paths = ws.dataset(DATASET)
    for config in ("resunet_cascade_liver", "resunet_cascade_tumour"):
        if not paths.model.fold(config, 1).metrics.is_file():
            train_fold(paths, config, 1, FAST)
    liver_dir, tumour_dir = paths.model.fold("resunet_cascade_liver", 1).validation, paths.model.fold("resunet_cascade_tumour", 1).validation
    cases = sorted(p.stem for p in tumour_dir.glob("*.npz"))
    assert cases and cases == sorted(p.stem for p in liver_dir.glob("*.npz"))
    for case in cases:
        with np.load(liver_dir / f"{case}.npz") as a, np.load(tumour_dir / f"{case}.npz") as b:
            liver_stage, fused = a["probabilities"].astype(np.float32), b["probabilities"].astype(np.float32)
        assert np.allclose(fused[0], liver_stage[0], atol=2e-3)  # background is the liver stage's
        tumour = fused.argmax(0) == 2
        assert not (tumour & (liver_stage.argmax(0) == 0)).any()  # never tumour outside the liver stage's liver


def test_encoder_weights_start_the_encoder(ws, tmp_path):
    import dataclasses

    import torch

    from autoliver.io.checkpoint import load_checkpoint
    from autoliver.nets import build_network, net_spec

    paths = ws.dataset(DATASET)
    config = Plans.load(paths.plans).configurations["resnet50_unet"]
    source = build_network("resnet50_unet", net_spec(config, 3))
    torch.nn.init.constant_(source.encoder.conv1.weight, 0.125)
    torch.save(source.encoder.state_dict(), tmp_path / "encoder.pt")
    options = dataclasses.replace(NO_VALIDATION, epochs=1, iters_per_epoch=1, encoder_weights=tmp_path / "encoder.pt", initial_lr=1e-12)
    train_fold(paths, "resnet50_unet", 2, options)
    weights = load_checkpoint(paths.model.fold("resnet50_unet", 2).final, map_location="cpu")["weights"]
    assert torch.allclose(weights["encoder.conv1.weight"], torch.full_like(weights["encoder.conv1.weight"], 0.125), atol=1e-3)
    bad = tmp_path / "evil.pt"
    bad.write_bytes(b"not a weight file")
    with pytest.raises(ValueError, match="evil.pt"):
        train_fold(paths, "resnet50_unet", "all", dataclasses.replace(options, encoder_weights=bad))


def test_training_a_tumour_stage_trains_its_liver_stage_first(ws):
    paths = ws.dataset(DATASET)
    assert not paths.model.fold("mixpool_cascade_liver", "all").final.is_file()
    train_fold(paths, "mixpool_cascade_tumour", "all", NO_VALIDATION)
    assert paths.model.fold("mixpool_cascade_liver", "all").final.is_file() and paths.model.fold("mixpool_cascade_tumour", "all").final.is_file()


def test_a_recipe_is_selectable_like_a_planned_configuration(ws, tmp_path):
    paths = ws.dataset(DATASET)
    import dataclasses

    for fold in range(3):
        fp = paths.model.fold("fcn_r50", fold)
        if not fp.metrics.is_file():  # a fold trained above without validation is resumed and validated
            train_fold(paths, "fcn_r50", fold, dataclasses.replace(FAST, resume=fp.latest.is_file()))
    result = api.find_best_configuration(DATASET, ws, ["fcn_r50"], options=api.StageOptions(progress=False), crf=False)
    assert result.plan.configurations == ("fcn_r50",) and result.plan.folds["fcn_r50"] == ("0", "1", "2")
    image = sorted((ws.raw / DATASET / "imagesTr").glob("*_0000.nii.gz"))[0]
    summary = api.predict(image, tmp_path / "out", ws, dataset_spec=DATASET, device="cpu", options=PredictOptions(tta=False, progress=False))
    assert not summary.failed
    report = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert "fcn_r50" in json.dumps(report["configuration"])
