"""Recipes derive configurations from the planned ones: only what they override changes, a
voxel-changing option gets its own data folder, plans without derived configurations keep
their hash, and plans.json round-trips."""

from __future__ import annotations

import json

import pytest

from planning.errors import PlanError
from planning.planner import plan_experiment
from planning.plans import CONFIGURATION_NAMES, Plans
from planning.recipes import RECIPES, check_preprocessing, data_identifier, derive, median_frequency_weights
from tests.test_planner import make_fingerprint

FRACTIONS = {"0": 0.96, "1": 0.035, "2": 0.005}


def test_median_frequency_weights():
    assert median_frequency_weights(FRACTIONS, 3) == pytest.approx([0.035 / 0.96, 1.0, 0.035 / 0.005], rel=1e-5)
    assert median_frequency_weights({"0": 0.5, "1": 0.5}, 3)[2] == pytest.approx(1.0)  # an unseen class: the largest weight
    with pytest.raises(PlanError, match="class fractions"):
        median_frequency_weights({}, 3)


def test_segnet_needs_and_records_class_weights():
    p = plan_experiment(make_fingerprint((1.0, 0.77, 0.77), (432, 512, 512), 131), memory_gb=8.0)
    with pytest.raises(PlanError, match="class fractions"):
        derive(p, "segnet_vgg16")
    c = derive(p, "segnet_vgg16", class_fractions=FRACTIONS).configurations["segnet_vgg16"]
    assert c.training["class_weights"] == median_frequency_weights(FRACTIONS, 3)


@pytest.fixture(scope="module")
def plans() -> Plans:
    return plan_experiment(make_fingerprint((1.0, 0.77, 0.77), (432, 512, 512), 131), memory_gb=8.0)


def test_plans_without_derived_configurations_keep_their_json_and_hash(plans):
    d = plans.to_json()
    assert "data_preprocessing" not in d
    for c in d["configurations"].values():
        assert not {"inherits_from", "recipe", "network", "network_options", "training", "stage", "liver_stage"} & set(c)
    again = Plans.from_json(json.loads(json.dumps(d)))
    assert again.plans_hash == plans.plans_hash and again == plans


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_derives_and_round_trips(plans, name):
    recipe = RECIPES[name]
    derived = derive(plans, name, class_fractions=FRACTIONS)
    assert set(derived.configurations) == set(plans.configurations) | set(recipe.configuration_names)
    for v, cname in zip(recipe.variants, recipe.configuration_names):
        c, base = derived.configurations[cname], plans.configurations[v.inherits_from]
        assert c.inherits_from == v.inherits_from and c.recipe == name and c.network == v.network and c.stage == v.stage
        assert c.network_dims == base.network_dims and c.batch_size == base.batch_size  # what is not overridden stays the planner's
        assert c.patch_size == (v.patch_size or base.patch_size)
        factor = float(v.preprocessing.get("inplane_factor", 1.0))
        assert c.spacing == (base.spacing[0], base.spacing[1] * factor, base.spacing[2] * factor)
        assert derived.data_spacings[c.data_identifier] == c.spacing
        if v.preprocessing:
            assert c.data_identifier != base.data_identifier and derived.data_preprocessing[c.data_identifier]["base"] == base.data_identifier
        else:
            assert c.data_identifier == base.data_identifier
        if v.stage == "tumour":
            assert c.liver_stage == recipe.name + "_liver"
    for planned in CONFIGURATION_NAMES:
        if planned in plans.configurations:
            assert derived.configurations[planned] == plans.configurations[planned]
    back = Plans.from_json(json.loads(json.dumps(derived.to_json())))
    assert back == derived and back.plans_hash == derived.plans_hash != plans.plans_hash


def test_same_options_share_one_data_folder_and_different_ones_do_not(plans):
    both = derive(derive(plans, "mixpool_cascade"), "resunet_cascade")
    assert both.configurations["mixpool_cascade_liver"].data_identifier == both.configurations["mixpool_cascade_tumour"].data_identifier
    assert both.configurations["resunet_cascade_liver"].data_identifier == "fullres"
    assert data_identifier("fullres", {"intensity": "window", "window_hu": [-100, 300]}) != data_identifier("fullres", {"intensity": "window", "window_hu": [-100, 400]})


def test_rederiving_replaces_a_recipes_configurations_and_overrides_apply(plans):
    once = derive(plans, "unet2d_clahe", {"patch_size": [128, 128], "training": {"lr": 3e-4}})
    c = once.configurations["unet2d_clahe"]
    assert c.patch_size == (128, 128) and c.training["lr"] == 3e-4 and c.training["early_stopping_patience"] == 10
    twice = derive(once, "unet2d_clahe")
    assert twice.configurations["unet2d_clahe"].patch_size == (256, 256)


@pytest.mark.parametrize("options, words", [
    ({"colour": 1}, "unknown preprocessing option"),
    ({"intensity": "gamma"}, "intensity 'gamma'"),
    ({"intensity": "window", "window_hu": [300, -100]}, "low < high"),
    ({"gaussian_sigma_voxels": -1}, "gaussian_sigma_voxels"),
])
def test_bad_preprocessing_options_are_plan_errors(options, words):
    with pytest.raises(PlanError, match=words):
        check_preprocessing(options)


def test_unknown_recipe_and_missing_base_are_plan_errors(plans):
    with pytest.raises(PlanError, match="unknown recipe"):
        derive(plans, "nope")
    only_3d = Plans(**{**plans.__dict__, "configurations": {"3d_fullres": plans.configurations["3d_fullres"]}})
    with pytest.raises(PlanError, match="planned configuration '2d'"):
        derive(only_3d, "segnet_vgg16")


def test_a_bad_stage_in_plans_json_is_refused(plans):
    d = derive(plans, "segnet_vgg16", class_fractions=FRACTIONS).to_json()
    d["configurations"]["segnet_vgg16"]["stage"] = "spleen"
    with pytest.raises(ValueError, match="stage 'spleen'"):
        Plans.from_json(d)


@pytest.mark.parametrize("mutate, words", [
    (lambda d: d["normalisation"].update(mean=None), "finite numbers"),
    (lambda d: d["normalisation"].update(mean=float("nan")), "finite numbers"),
    (lambda d: d["normalisation"].update(std=0.0), "std > 0"),
    (lambda d: d["configurations"]["2d"].update(patch_size=[0, 64]), "patch_size"),
    (lambda d: d["configurations"]["2d"].update(spacing=[1.0, 1e-400, 1.0]), "spacing"),
    (lambda d: d["configurations"]["2d"].update(batch_size=0), "batch_size"),
])
def test_plans_values_a_reader_would_misuse_are_refused(plans, mutate, words):
    d = json.loads(json.dumps(plans.to_json()))
    mutate(d)
    with pytest.raises(ValueError, match=words):
        Plans.from_json(d, "plans.json")
