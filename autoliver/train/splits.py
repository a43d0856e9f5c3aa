"""Cross-validation splits: deterministic 5-fold by default, or a user file (patient-grouped).

``results/<dataset>/splits.json`` is a JSON list with one object per fold:
``[{"train": [case ids], "val": [case ids]}, ...]`` (nnU-Net's layout). It is written on first
use and reused afterwards, so every configuration and every later run sees the same folds.
A file given with ``--splits`` is validated (every id known, no case in both train and val of
a fold, each fold non-empty) and copied there when no splits exist yet; when they exist and
differ, the run stops rather than mixing two sets of folds in one results folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from autoliver.core.errors import AutoliverError, SplitsError, UsageError
from autoliver.core.layout import ModelPaths, plain_name
from autoliver.io.atomic import write_json
from autoliver.io.jsonfile import read_json

log = logging.getLogger(__name__)

N_FOLDS = 5
SPLITS_SEED = 12345  # nnU-Net's seed for its KFold; fixed so splits never depend on --seed


def make_splits(case_ids: list[str], n_folds: int = N_FOLDS, seed: int = SPLITS_SEED) -> list[dict[str, list[str]]]:
    """Shuffle the sorted ids with ``seed`` and deal them into ``n_folds`` validation sets."""
    ids = sorted(case_ids)
    if len(ids) < 2:
        raise SplitsError(f"cross-validation needs at least 2 cases, got {len(ids)}; train fold 'all' instead")
    n = min(n_folds, len(ids))
    order = np.random.default_rng(seed).permutation(len(ids))
    folds = []
    for k in range(n):
        val = sorted(ids[i] for i in order[k::n])
        folds.append({"train": [c for c in ids if c not in set(val)], "val": val})
    return folds


def validate_splits(splits, case_ids: list[str] | None, source: str) -> list[dict[str, list[str]]]:
    """Check the structure and ids of a splits list (ids plain names, and among ``case_ids``
    when given); return it normalised (sorted lists)."""
    fix = "fix the file or delete it to get the default 5 folds"
    if not isinstance(splits, list) or not splits:
        raise SplitsError(f"{source}: expected a non-empty JSON list of {{\"train\": [...], \"val\": [...]}} objects; {fix}")
    known = None if case_ids is None else set(case_ids)
    out = []
    for k, fold in enumerate(splits):
        if not isinstance(fold, dict) or not isinstance(fold.get("train"), list) or not isinstance(fold.get("val"), list):
            raise SplitsError(f"{source}: fold {k} is not an object with lists \"train\" and \"val\"; {fix}")
        if not all(isinstance(c, str) for c in fold["train"] + fold["val"]):
            raise SplitsError(f"{source}: fold {k}: case ids must be strings; {fix}")
        train, val = list(fold["train"]), list(fold["val"])
        for c in train + val:
            try:
                plain_name(c, "case id")
            except AutoliverError as exc:
                raise SplitsError(f"{source}: fold {k}: {exc}") from None
        unknown = [] if known is None else sorted((set(train) | set(val)) - known)
        if unknown:
            raise SplitsError(f"{source}: fold {k} names case(s) not in the preprocessed data: {', '.join(unknown[:10])}; {fix}")
        both = sorted(set(train) & set(val))
        if both:
            raise SplitsError(f"{source}: fold {k} has case(s) in both train and val: {', '.join(both[:10])}; {fix}")
        if not train or not val:
            raise SplitsError(f"{source}: fold {k} has an empty train or val list; {fix}")
        out.append({"train": sorted(set(train)), "val": sorted(set(val))})
    return out


def _read(path: Path) -> object:
    return read_json(path, SplitsError, "fix it or delete it to get the default 5 folds")


def load_or_create_splits(results_dir: Path, case_ids: list[str], custom: Path | None = None) -> tuple[list[dict[str, list[str]]], Path]:
    """The dataset's splits (created or copied from ``custom`` on first use) and their path."""
    path = ModelPaths(Path(results_dir)).splits
    wanted = validate_splits(_read(Path(custom)), case_ids, str(custom)) if custom is not None else None
    if path.is_file():
        existing = validate_splits(_read(path), case_ids, str(path))
        if wanted is not None and wanted != existing:
            raise SplitsError(f"{custom}: differs from the splits already used in {path}; train into another workspace or delete {path} (and the folds trained with it)")
        return existing, path
    splits = wanted if wanted is not None else make_splits(case_ids)
    write_json(path, splits)
    log.info("wrote %s (%d folds)", path, len(splits))
    return splits, path


def write_new_splits(results_dir: Path, case_ids: list[str], n_folds: int, overwrite: bool = False) -> tuple[list[dict[str, list[str]]], Path]:
    """Write ``n_folds``-fold splits (e.g. 10 as in the mixed-pooling paper). Existing splits are
    replaced only with ``overwrite`` and only while no fold has been trained with them."""
    if n_folds < 2:
        raise UsageError(f"--folds must be >= 2, got {n_folds}")
    model = ModelPaths(Path(results_dir))
    if model.splits.is_file():
        trained = [p for p in model.fold_dirs() if not p.name.endswith("_all") and any(p.glob("checkpoint_*.pt"))]
        if not overwrite:
            raise SplitsError(f"{model.splits}: exists; add --overwrite to replace it")
        if trained:
            raise SplitsError(f"{model.splits}: {len(trained)} fold(s) were trained with these splits (e.g. {trained[0]}); "
                              "delete them first or use another workspace")
    splits = make_splits(case_ids, n_folds)
    write_json(model.splits, splits)
    log.info("wrote %s (%d folds)", model.splits, len(splits))
    return splits, model.splits


def fold_cases(splits: list[dict[str, list[str]]], fold: int | str, case_ids: list[str]) -> tuple[list[str], list[str]]:
    """(train, val) case ids of ``fold`` (an index or "all": every case in both)."""
    if fold == "all":
        ids = sorted(case_ids)
        return ids, ids
    if not isinstance(fold, int) or not 0 <= fold < len(splits):
        raise UsageError(f"fold must be 0..{len(splits) - 1} or 'all', got {fold!r}")
    return list(splits[fold]["train"]), list(splits[fold]["val"])


def holding_fold(splits: list[dict[str, list[str]]], case_id: str) -> int | None:
    """The fold whose validation set holds ``case_id``."""
    for k, fold in enumerate(splits):
        if case_id in fold["val"]:
            return k
    return None
