"""The published systems autoliver reproduces, as recipes: configurations derived from a
planned one (``inherits_from``) that override only what differs.

A recipe is data: for each of its configurations, the planned configuration it starts from,
the network family and its options, the preprocessing options that change voxel values (they
get their own data folder, named from the options), the training options (loss, optimiser,
schedule, stopping rule) and, for a two-stage design, the stage. ``derive(plans, recipe)``
returns the plans with the recipe's configurations added; what a recipe does not override
(spacing, normalisation, batch) stays the planner's. Sizing a fixed-input network against the
memory budget needs the network registry and happens in ``autoliver.nets.sizing``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from planning.errors import PlanError
from planning.hashing import hash_json
from planning.plans import Configuration, Plans

PREPROCESSING_KEYS = ("intensity", "window_hu", "histogram_equalisation", "clahe", "gaussian_sigma_voxels", "inplane_factor")
INTENSITY_MODES = ("ct", "window", "zscore_image")


@dataclass(frozen=True)
class Variant:
    """One configuration of a recipe."""

    suffix: str  # appended to the recipe's name ("" for a one-configuration recipe)
    inherits_from: str  # a planned configuration: "2d", "2.5d" or "3d_fullres"
    network: str
    network_options: Mapping[str, Any] = field(default_factory=dict)
    preprocessing: Mapping[str, Any] = field(default_factory=dict)  # see PREPROCESSING_KEYS
    training: Mapping[str, Any] = field(default_factory=dict)
    stage: str = "single"
    patch_size: tuple[int, ...] | None = None  # a fixed input size (else the planner's patch)


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    source: str  # the paper section the recipe follows
    variants: tuple[Variant, ...]
    postprocessing: tuple[str, ...] = ()  # steps the paper applies (find_best_configuration still decides on CV)

    @property
    def configuration_names(self) -> tuple[str, ...]:
        return tuple(self.name + v.suffix for v in self.variants)


_ADAM_DICE = {"loss": "dice", "optimiser": "adam", "lr": 1e-3}
_VGG_RESNET_2D = {"loss": "dice_ce", "optimiser": "adam", "lr": 1e-4}
_MIXPOOL_PRE = {"intensity": "window", "window_hu": [-100.0, 300.0], "histogram_equalisation": True}

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("dualpath3d", "3D dual-path multi-scale CNN (a normal and a downsampled-context path of eight conv-BN-ReLU "
           "blocks each, 1x1x1 'fully connected' layers), Gaussian smoothing, per-image z-score, 512 -> 256 in-plane; dense 3D CRF",
           "3D dual-path multi-scale CNN with CRF: network, preprocessing and post-processing sections",
           (Variant("", "3d_fullres", "dualpath3d", {},
                    {"intensity": "zscore_image", "gaussian_sigma_voxels": 1.0, "inplane_factor": 2.0},
                    {"loss": "ce", "optimiser": "sgd", "lr": 1e-2}),),
           postprocessing=("dense_crf",)),
    Recipe("segnet_vgg16", "2D SegNet: VGG-16-BN encoder (13 conv), decoder upsampling with the pooling indices; "
           "cross-entropy weighted by median-frequency class balancing",
           "SegNet/VGG-16 comparison in the dual-path paper",
           (Variant("", "2d", "segnet_vgg16", {}, {}, {"loss": "ce_median_frequency", "optimiser": "sgd", "lr": 1e-2}),)),
    Recipe("resunet_cascade", "2D residual U-Net (pre-activation blocks, 1x1 projections), Dice loss, Adam; liver stage on "
           "whole slices, then a tumour stage on the liver's box at full in-plane resolution",
           "2D ResUNet liver -> tumour cascade",
           (Variant("_liver", "2d", "resunet2d", {}, {}, {"loss": "dice", "optimiser": "adam", "lr": 1e-4}, stage="liver"),
            Variant("_tumour", "2d", "resunet2d", {}, {}, {"loss": "dice", "optimiser": "adam", "lr": 1e-4}, stage="tumour"))),
    Recipe("mixpool_cascade", "cascaded 2D U-Net with learned mixed max/average pooling and bottleneck dropout 0.5; HU window "
           "[-100, 300] and histogram equalisation; 96x96 slices; liver then lesion stage on the liver crop; dense 3D CRF",
           "cascaded mixed-pooling U-Net",
           (Variant("_liver", "2d", "mixpool_unet2d", {"dropout": 0.5}, _MIXPOOL_PRE, dict(_ADAM_DICE), "liver", (96, 96)),
            Variant("_tumour", "2d", "mixpool_unet2d", {"dropout": 0.5}, _MIXPOOL_PRE, dict(_ADAM_DICE), "tumour", (96, 96))),
           postprocessing=("dense_crf",)),
    Recipe("unet2d_clahe", "classic 2D U-Net (64 -> 1024 features) on CLAHE-enhanced 256x256 slices; Dice loss, Adam 1e-3, "
           "early stopping on validation loss (patience 10), reduce-LR-on-plateau (factor 0.5)",
           "U-Net with CLAHE",
           (Variant("", "2d", "unet2d_classic", {}, {"intensity": "window", "window_hu": [-100.0, 400.0], "clahe": {"clip_limit": 0.01}},
                    {**_ADAM_DICE, "schedule": "plateau", "plateau_factor": 0.5, "early_stopping_patience": 10}, patch_size=(256, 256)),)),
    Recipe("resnet50_unet", "2D U-Net with a ResNet-50 encoder (3-4-6-3 bottlenecks): the comparison paper's main model",
           "ResNet-50 / DeepLabv3+ / VGG-16 / FCN comparison", (Variant("", "2d", "resnet50_unet", {}, {}, dict(_VGG_RESNET_2D)),)),
    Recipe("deeplabv3plus_r101", "DeepLabv3+ on ResNet-101 (atrous spatial pyramid pooling, output stride 16, decoder)",
           "ResNet-50 / DeepLabv3+ / VGG-16 / FCN comparison", (Variant("", "2d", "deeplabv3plus_r101", {}, {}, dict(_VGG_RESNET_2D)),)),
    Recipe("vgg16_unet", "2D U-Net with a VGG-16-BN encoder (13 conv layers)",
           "ResNet-50 / DeepLabv3+ / VGG-16 / FCN comparison", (Variant("", "2d", "vgg16_unet", {}, {}, dict(_VGG_RESNET_2D)),)),
    Recipe("fcn_r50", "FCN-8s style head on a ResNet-50 encoder", "ResNet-50 / DeepLabv3+ / VGG-16 / FCN comparison",
           (Variant("", "2d", "fcn_r50", {}, {}, dict(_VGG_RESNET_2D)),)),
)}


def check_preprocessing(options: Mapping[str, Any], where: str = "preprocessing") -> dict:
    """The options, checked (known keys, sane values); PlanError naming ``where`` otherwise."""
    unknown = sorted(set(options) - set(PREPROCESSING_KEYS))
    if unknown:
        raise PlanError(f"{where}: unknown preprocessing option(s) {', '.join(unknown)}; known: {', '.join(PREPROCESSING_KEYS)}")
    out = dict(options)
    if out.get("intensity", "ct") not in INTENSITY_MODES:
        raise PlanError(f"{where}: intensity {out['intensity']!r} is not one of {', '.join(INTENSITY_MODES)}")
    if out.get("intensity") == "window":
        lo, hi = (float(v) for v in out.get("window_hu", ()))
        if not lo < hi:
            raise PlanError(f"{where}: window_hu must be [low, high] HU with low < high, got {out.get('window_hu')}")
    if float(out.get("gaussian_sigma_voxels", 0.0)) < 0 or float(out.get("inplane_factor", 1.0)) <= 0:
        raise PlanError(f"{where}: gaussian_sigma_voxels must be >= 0 and inplane_factor > 0")
    return out


def data_identifier(base: str, options: Mapping[str, Any]) -> str:
    """The data folder of ``base``'s data preprocessed with ``options`` (``base`` when there are none)."""
    return base if not options else f"{base}_{hash_json(dict(options))[:8]}"


def _derive_variant(plans: Plans, recipe: str, v: Variant, liver_stage: str | None,
                    overrides: Mapping[str, Any]) -> tuple[Configuration, str, dict, tuple[float, float, float]]:
    if v.inherits_from not in plans.configurations or plans.configurations[v.inherits_from].derived:
        raise PlanError(f"recipe {recipe}: needs the planned configuration {v.inherits_from!r}; planned: {', '.join(plans.configurations)}")
    base = plans.configurations[v.inherits_from]
    pre = check_preprocessing({**v.preprocessing, **overrides.get("preprocessing", {})}, f"recipe {recipe}")
    factor = float(pre.get("inplane_factor", 1.0))
    spacing = (base.spacing[0], base.spacing[1] * factor, base.spacing[2] * factor)
    median = (base.median_shape[0], max(1, round(base.median_shape[1] / factor)), max(1, round(base.median_shape[2] / factor)))
    ident = data_identifier(base.data_identifier, pre)
    patch = tuple(int(p) for p in overrides.get("patch_size", v.patch_size or base.patch_size))
    if len(patch) != len(base.patch_size):
        raise PlanError(f"recipe {recipe}: patch {patch} has {len(patch)} axes, {v.inherits_from} needs {len(base.patch_size)}")
    config = replace(
        base, name=recipe + v.suffix, inherits_from=v.inherits_from, recipe=recipe, network=v.network,
        network_options={**v.network_options, **overrides.get("network_options", {})},
        training={**v.training, **overrides.get("training", {})}, stage=v.stage, liver_stage=liver_stage,
        data_identifier=ident, spacing=spacing, median_shape=median, patch_size=patch, previous_stage=None,
        extra={"recipe": recipe, "inherits_from": v.inherits_from, "fixed_patch": bool(v.patch_size or "patch_size" in overrides)},
    )
    return config, ident, pre, spacing


def median_frequency_weights(class_fractions: Mapping[str, float], n_classes: int) -> list[float]:
    """Median-frequency class balancing (SegNet): w_c = median(f) / f_c over the classes' voxel
    fractions ``class_fractions`` ({"0": f0, "1": f1, ...}, the fingerprint's); a class never
    seen gets the largest weight of the others."""
    f = [float(class_fractions.get(str(c), 0.0)) for c in range(n_classes)]
    seen = sorted(v for v in f if v > 0)
    if not seen:
        raise PlanError("median-frequency weights need the fingerprint's class fractions; none is positive")
    median = seen[len(seen) // 2] if len(seen) % 2 else 0.5 * (seen[len(seen) // 2 - 1] + seen[len(seen) // 2])
    weights = [median / v if v > 0 else 0.0 for v in f]
    top = max(weights)
    return [round(w if w > 0 else top, 6) for w in weights]


def derive(plans: Plans, recipe: Recipe | str, overrides: Mapping[str, Any] | None = None,
           class_fractions: Mapping[str, float] | None = None) -> Plans:
    """``plans`` with ``recipe``'s configurations added (replacing earlier ones of that recipe).

    ``overrides`` (e.g. ``{"patch_size": [128, 128], "training": {"lr": 3e-4}}``) apply to every
    configuration of the recipe.
    """
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise PlanError(f"unknown recipe {recipe!r}; shipped: {', '.join(RECIPES)} (see `autoliver recipes`)")
        recipe = RECIPES[recipe]
    overrides = overrides or {}
    configs = {k: c for k, c in plans.configurations.items() if c.recipe != recipe.name}
    n_classes = len(plans.labels)
    spacings, pre_by_ident = dict(plans.data_spacings), dict(plans.data_preprocessing)
    liver = None
    for v in recipe.variants:
        config, ident, pre, spacing = _derive_variant(plans, recipe.name, v, liver if v.stage == "tumour" else None, overrides)
        if v.stage == "tumour" and liver is None:
            raise PlanError(f"recipe {recipe.name}: its tumour stage needs a liver stage before it")
        if config.name in CONFIG_RESERVED:
            raise PlanError(f"recipe {recipe.name}: configuration name {config.name} is reserved for a planned configuration")
        if ident in spacings and ident not in pre_by_ident and tuple(spacings[ident]) != spacing:
            raise PlanError(f"recipe {recipe.name}: data identifier {ident} clashes with a planned data folder")
        if config.training.get("loss") == "ce_median_frequency" and "class_weights" not in config.training:
            if class_fractions is None:
                raise PlanError(f"recipe {recipe.name}: its loss needs the fingerprint's class fractions (fingerprint.json)")
            config = replace(config, training={**config.training, "class_weights": median_frequency_weights(class_fractions, n_classes)})
        spacings[ident] = spacing
        if pre:
            pre_by_ident[ident] = {**pre, "base": plans.configurations[v.inherits_from].data_identifier}
        configs[config.name] = config
        if v.stage == "liver":
            liver = config.name
    return replace(plans, configurations=configs, data_spacings=spacings, data_preprocessing=pre_by_ident)


CONFIG_RESERVED = ("2d", "2.5d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")
