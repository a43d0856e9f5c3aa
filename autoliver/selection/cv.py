"""The cross-validation predictions of a dataset's trained configurations.

A configuration takes part only when every fold of ``results/<dataset>/splits.json`` is
complete: ``<config>/fold_<k>/metrics.json`` written with the current plans and
``validation/<case>.npz`` for each of the fold's validation cases. Scoring happens in the
fullres preprocessed grid, where the reference labels are; ``3d_lowres`` probabilities are
resampled to it. ``3d_cascade_fullres`` stands for the cascade, so it also needs every fold of
``3d_lowres`` (prediction runs both).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoliver.core.errors import MissingArtefactError, PlanError, SplitsError, StaleArtefactError, UsageError
from autoliver.core.layout import METRICS, DatasetPaths, ModelPaths
from autoliver.io.jsonfile import read_json
from autoliver.io.plans_file import load_plans
from autoliver.preprocess.storage import load_case
from autoliver.train.splits import validate_splits
from planning.plans import Plans

log = logging.getLogger(__name__)

# order of preference among equally good candidates of the same size
CASCADE, LOWRES = "3d_cascade_fullres", "3d_lowres"


@dataclass(frozen=True)
class CVSource:
    """What selection reads: plans, splits and the complete configurations' folds."""

    dataset: str
    preprocessed_dir: Path
    results_dir: Path
    plans: Plans
    splits: tuple[dict, ...]
    configurations: tuple[str, ...]  # complete, in the plans' preference order
    folds: dict[str, tuple[str, ...]]
    skipped: dict[str, str]  # incomplete configuration -> what is missing and the command to run
    reference_id: str  # data identifier of the scoring grid ("fullres")

    @property
    def cases(self) -> tuple[str, ...]:
        return tuple(sorted(c for fold in self.splits for c in fold["val"]))

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in self.plans.data_spacings[self.reference_id])

    def holding_fold(self, case: str) -> int:
        for k, fold in enumerate(self.splits):
            if case in fold["val"]:
                return k
        raise UsageError(f"case {case!r} is in no validation set of {self.results_dir / 'splits.json'}")


def _train_cmd(dataset: str, config: str, fold: int | str) -> str:
    return f"`autoliver train -d {dataset} {config} {fold}`"


def fold_problems(results_dir: Path, dataset: str, config: str, splits: Sequence[dict], plans: Plans) -> list[str]:
    """What is missing or stale in ``config``'s folds, one message per fold (empty: complete)."""
    problems, untrained = [], []
    for k, fold in enumerate(splits):
        fold_paths = ModelPaths(results_dir).fold(config, k)
        fold_dir, metrics_path = fold_paths.root, fold_paths.metrics
        if not metrics_path.is_file():
            untrained.append(k)
            continue
        try:
            metrics = read_json(metrics_path, PlanError)
            if not isinstance(metrics, dict):
                raise PlanError(f"{metrics_path}: not a JSON object")
        except PlanError:
            problems.append(f"{config} fold {k}: {metrics_path} is not a valid metrics file; run `autoliver train -d {dataset} {config} {k} --continue`")
            continue
        if metrics.get("plans_hash") is not None and not plans.hash_matches(metrics["plans_hash"], config):
            problems.append(f"{config} fold {k}: {fold_dir} was trained with another plans.json; delete it and run {_train_cmd(dataset, config, k)}")
            continue
        missing = [c for c in fold["val"] if not fold_paths.validation_case(c, ".npz").is_file()]
        if missing:
            problems.append(f"{config} fold {k}: {len(missing)} validation probabilities missing in {fold_paths.validation} "
                            f"({', '.join(missing[:3])}); delete that folder and run `autoliver train -d {dataset} {config} {k} --continue`")
    if untrained:
        where = ModelPaths(results_dir).configuration(config) / "fold_K" / METRICS
        problems.insert(0, f"{config} fold{'s' if len(untrained) > 1 else ''} {', '.join(map(str, untrained))} not trained (no {where}); run "
                           + ", ".join(_train_cmd(dataset, config, k) for k in untrained))
    return problems


def discover(preprocessed_dir: str | Path, results_dir: str | Path, configurations: Sequence[str] | None = None) -> CVSource:
    """Check plans, splits and folds; the configurations given (default: every one trained).

    A configuration given explicitly that is incomplete is an error naming the command that
    completes it; one found by looking is skipped with that message (``CVSource.skipped``).
    """
    preprocessed_dir, results_dir = Path(preprocessed_dir), Path(results_dir)
    dataset = results_dir.name
    paths = DatasetPaths(dataset, preprocessed_dir, results_dir)
    plans, plans_path = load_plans(paths), paths.plans
    splits_path = ModelPaths(results_dir).splits
    if not splits_path.is_file():
        raise MissingArtefactError(f"{splits_path}: not found, so nothing is trained yet; run {_train_cmd(dataset, '3d_fullres', 'FOLD')} for folds 0..4")
    splits = tuple(validate_splits(read_json(splits_path, SplitsError), None, str(splits_path)))
    explicit = configurations is not None and len(configurations) > 0
    if explicit:
        not_planned = [c for c in configurations if c not in plans.configurations]
        if not_planned:
            raise PlanError(f"configuration(s) {', '.join(not_planned)} not in {plans_path}; planned: {', '.join(plans.configurations)}")
        wanted = [c for c in plans.ordered_configurations() if c in configurations]
    else:
        wanted = [c for c in plans.ordered_configurations() if ModelPaths(results_dir).configuration(c).is_dir()]
    problems = {c: fold_problems(results_dir, dataset, c, splits, plans) for c in wanted}
    if CASCADE in wanted and not problems[CASCADE]:
        lowres = problems.get(LOWRES)
        if lowres is None:
            lowres = fold_problems(results_dir, dataset, LOWRES, splits, plans)
        if lowres:
            problems[CASCADE] = [f"{CASCADE} needs its first stage: " + p for p in lowres]
    complete = tuple(c for c in wanted if not problems[c])
    skipped = {c: "; ".join(p) for c, p in problems.items() if p}
    if explicit and skipped:
        raise MissingArtefactError("incomplete cross-validation:\n" + "\n".join(f"  - {p}" for c in wanted for p in problems[c]))
    if not complete:
        detail = ("\n" + "\n".join(f"  - {p}" for c in wanted for p in problems[c])) if skipped else \
            f" no trained configuration in {results_dir}; run {_train_cmd(dataset, '3d_fullres', 'FOLD')} for folds 0..{len(splits) - 1}"
        raise MissingArtefactError(f"no configuration with every fold trained:{detail}")
    for config, message in skipped.items():
        log.warning("left out %s: %s", config, message)
    full_ids = [plans.configurations[c].data_identifier for c in plans.ordered_configurations() if c != LOWRES and not plans.configurations[c].derived]
    reference_id = full_ids[0] if full_ids else "fullres"
    folds = {c: tuple(str(k) for k in range(len(splits))) for c in complete}
    if CASCADE in complete:
        folds[LOWRES] = tuple(str(k) for k in range(len(splits)))
    return CVSource(dataset, preprocessed_dir, results_dir, plans, splits, complete, folds, skipped, reference_id)


def load_reference(source: CVSource, case: str) -> np.ndarray:
    """The reference label map of ``case`` in the scoring grid (uint8 (Z, Y, X))."""
    _, seg, _ = load_case(source.preprocessed_dir / source.reference_id, case, mmap=True)
    if seg is None:
        raise MissingArtefactError(f"{source.preprocessed_dir / source.reference_id}: case {case} has no label; "
                                   f"run `autoliver plan_and_preprocess {source.dataset} --overwrite`")
    return np.asarray(seg[...], dtype=np.uint8)


def load_image(source: CVSource, case: str) -> np.ndarray:
    """The normalised CT of ``case`` in the scoring grid (float32 (Z, Y, X))."""
    data, _, _ = load_case(source.preprocessed_dir / source.reference_id, case, mmap=True)
    return np.asarray(data[...], dtype=np.float32)


def load_probabilities(source: CVSource, config: str, case: str, shape: Sequence[int]) -> np.ndarray:
    """``config``'s cross-validation softmax of ``case`` (float32 (C, Z, Y, X)) in the scoring grid."""
    from autoliver.preprocess.resample import resample_probabilities

    path = ModelPaths(source.results_dir).fold(config, source.holding_fold(case)).validation_case(case, ".npz")
    with np.load(path) as z:
        probs = z["probabilities"].astype(np.float32)
    if tuple(probs.shape[1:]) == tuple(shape):
        return probs
    if source.plans.configurations[config].data_identifier == source.reference_id:
        raise StaleArtefactError(f"{path}: probabilities of shape {probs.shape[1:]} but the preprocessed case has {tuple(shape)}; "
                                 f"delete {path.parent} and run `autoliver train -d {source.dataset} {config} {source.holding_fold(case)} --continue`")
    return resample_probabilities(probs, shape)
