"""From a dataset's artefacts to one fold's training: the checks and wiring that ``autoliver
train`` does before the trainer runs (plans, preprocessed data up to date, splits, cascade
stages)."""

from __future__ import annotations

import logging
from dataclasses import replace

from autoliver.core.errors import MissingArtefactError, PlanError, StaleArtefactError, UsageError
from autoliver.core.layout import DatasetPaths
from autoliver.data.loader import default_pad_value
from autoliver.io.jsonfile import read_json
from autoliver.io.plans_file import load_plans
from autoliver.preprocess.runner import DATASET_PROPERTIES
from autoliver.preprocess.storage import DATA_SUFFIX, SEG_SUFFIX
from autoliver.train.distributed import SINGLE
from autoliver.train.options import TrainOptions
from autoliver.train.splits import fold_cases, holding_fold, load_or_create_splits
from autoliver.train.trainer import FoldSetup, Trainer

log = logging.getLogger(__name__)

LARGE_IMAGE_HINT = " (3d_lowres and 3d_cascade_fullres are planned only for images much larger than the patch)"


def _planned(plans, configuration: str, paths: DatasetPaths):
    if configuration not in plans.configurations:
        hint = LARGE_IMAGE_HINT if configuration in ("3d_lowres", "3d_cascade_fullres") else ""
        raise PlanError(f"configuration {configuration!r} not in {paths.plans}; planned: {', '.join(plans.configurations)}{hint}")
    return plans.configurations[configuration]


def _labelled_cases(paths: DatasetPaths, config, configuration: str) -> list[str]:
    data_folder = paths.data(config.data_identifier)
    props_path = data_folder / DATASET_PROPERTIES
    make = f"run `autoliver plan_and_preprocess {paths.name} -c {configuration}`"
    if not props_path.is_file():
        raise MissingArtefactError(f"{props_path}: not found; {make}")
    props = read_json(props_path, error=StaleArtefactError, fix=f"{make} --overwrite")
    spacing = props.get("spacing", []) if isinstance(props, dict) else []
    if any(abs(float(a) - float(b)) > 1e-6 * max(1.0, abs(float(b))) for a, b in zip(spacing, config.spacing)):
        raise StaleArtefactError(f"{data_folder}: preprocessed at spacing {spacing} mm but {paths.plans} asks for {list(config.spacing)}; {make} --overwrite")
    cases = [c for c in props.get("cases", []) if (data_folder / f"{c}{SEG_SUFFIX}").is_file()]
    if not cases:
        raise MissingArtefactError(f"{data_folder}: no preprocessed case with a label; {make}")
    return cases


def fold_setup(paths: DatasetPaths, configuration: str, fold: int | str, options: TrainOptions) -> FoldSetup:
    """Everything the trainer needs for one fold, checked against the artefacts on disk."""
    plans = load_plans(paths)
    config = _planned(plans, configuration, paths)
    if fold != "all" and not (isinstance(fold, int) and fold >= 0):
        raise UsageError(f"fold must be 0..4 or 'all', got {fold!r}")
    cases = _labelled_cases(paths, config, configuration)
    model = paths.model
    splits, splits_path = load_or_create_splits(model.root, cases, options.splits_file)
    if fold != "all" and fold >= len(splits):
        raise UsageError(f"fold {fold}: {splits_path} has {len(splits)} folds (0..{len(splits) - 1})")
    train_cases, val_cases = fold_cases(splits, fold, cases)
    prev_folder = None
    if config.previous_stage:
        prev_folder = model.next_stage(config.previous_stage)
        missing = [c for c in cases if not (prev_folder / f"{c}{DATA_SUFFIX}").is_file()]
        if missing:
            folds = sorted({str(holding_fold(splits, c)) for c in missing})
            raise MissingArtefactError(
                f"{prev_folder}: the {config.previous_stage} predictions of {len(missing)} case(s) ({', '.join(missing[:5])}) are missing; "
                f"run `autoliver train -d {paths.name} {config.previous_stage} FOLD` for fold(s) {', '.join(folds)} first")
    next_stage = None
    for other in plans.configurations.values():
        if other.previous_stage == configuration:
            full_folder = paths.data(other.data_identifier)
            if (full_folder / DATASET_PROPERTIES).is_file():
                next_stage = (full_folder, model.next_stage(configuration))
            else:
                log.warning("%s not preprocessed: %s predictions for %s will not be written", full_folder, configuration, other.name)
    liver_validation = None
    if config.stage == "tumour":
        if not config.liver_stage or config.liver_stage not in plans.configurations:
            raise PlanError(f"{paths.plans}: tumour stage {configuration} names no planned liver stage ({config.liver_stage!r}); add its recipe again")
        if fold != "all":
            liver_validation = model.fold(config.liver_stage, fold).validation
    labels = sorted(plans.labels.items(), key=lambda kv: kv[1])
    data_folder = paths.data(config.data_identifier)
    return FoldSetup(
        dataset=paths.name, config=config, plans_hash=plans.configuration_hash(configuration), fold=fold, data_folder=data_folder,
        output_dir=model.fold(configuration, fold).root, train_cases=tuple(train_cases), val_cases=tuple(val_cases),
        class_names=tuple(k for k, _ in labels), arch=options.arch or config.extra.get("arch") or config.network,
        prev_stage_folder=prev_folder, next_stage=next_stage, pad_value=default_pad_value(data_folder), plans_path=paths.plans,
        liver_validation=liver_validation,
    )


def train_fold(paths: DatasetPaths, configuration: str, fold: int | str, options: TrainOptions | None = None,
               dist=None, components=None):
    """Train one fold of one configuration; returns the trainer's TrainResult. A two-stage
    design's tumour stage trains its liver stage's fold first when that is not finished.

    Writes ``results/<dataset>/<configuration>/fold_<k>/`` (checkpoints, log.jsonl,
    progress.png, validation/, metrics.json) and ``results/<dataset>/splits.json`` on first use.
    ``dist`` a ``DistContext`` (torchrun); ``components`` replaces the network/loader factories.
    """
    options = options or TrainOptions()
    config = load_plans(paths).configurations.get(configuration)
    if config is not None and config.stage == "tumour" and config.liver_stage and not paths.model.fold(config.liver_stage, fold).final.is_file():
        log.info("%s fold %s needs its liver stage first: training %s fold %s", configuration, fold, config.liver_stage, fold)
        train_fold(paths, config.liver_stage, fold, replace(options, resume=paths.model.fold(config.liver_stage, fold).latest.is_file()),
                   dist, components)
    setup = fold_setup(paths, configuration, fold, options)
    log.info("%s %s fold %s: %d training, %d validation cases, network %s", paths.name, configuration, fold,
             len(setup.train_cases), len(setup.val_cases), setup.arch)
    return Trainer(setup, options, dist or SINGLE, components).run()
