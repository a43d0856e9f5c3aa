"""The artefact layout: every path autoliver reads or writes comes from here.

```
<workspace>/raw/DatasetNNN_Name/                     raw dataset (nnU-Net v2 layout)
<workspace>/preprocessed/DatasetNNN_Name/            fingerprint.json, plans.json, <data identifier>/
<workspace>/results/DatasetNNN_Name/                 splits.json, plans.json, inference_plan.json
    <configuration>/fold_<k>/                        checkpoints, log.jsonl, progress.png, validation/, metrics.json
    <configuration>/predicted_next_stage/            a 3d_lowres stage's held-out labels (cascade input)
```

A dataset is named by its folder path (absolute or relative), by its name
(``Dataset003_Liver``) or by its numeric id (``3``); every form finds the same artefacts.
Names that come from user data (case ids, configuration names, data identifiers, fold names)
pass :func:`plain_name` before they become part of a path, so no path can leave its folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from autoliver.core.errors import AutoliverError, DatasetError, UsageError

DATASET_NAME_RE = re.compile(r"^Dataset(?P<id>\d{3})_(?P<name>[A-Za-z0-9_\-]+)$")
DATASET_JSON = "dataset.json"
FINGERPRINT = "fingerprint.json"
PLANS = "plans.json"
SPLITS = "splits.json"
INFERENCE_PLAN = "inference_plan.json"
NEXT_STAGE = "predicted_next_stage"
CHECKPOINT_LATEST, CHECKPOINT_BEST, CHECKPOINT_FINAL = "checkpoint_latest.pt", "checkpoint_best.pt", "checkpoint_final.pt"
CHECKPOINTS = (CHECKPOINT_FINAL, CHECKPOINT_BEST, CHECKPOINT_LATEST)  # preference order for prediction
TRAIN_LOG, PROGRESS_PNG, METRICS, VALIDATION = "log.jsonl", "progress.png", "metrics.json", "validation"
FOLD_PREFIX = "fold_"
_BAD_NAME_CHARS = re.compile(r"[/\\\x00-\x1f:*?\"<>|]")
MAX_NAME_LENGTH = 200


def plain_name(name: object, what: str = "name", source: str = "") -> str:
    """``name`` if it is a plain file name (no folder separators, not ``.``/``..``, no control
    characters, not hidden, at most 200 characters), else AutoliverError naming ``source``."""
    where = f"{source}: " if source else ""
    if not isinstance(name, str) or not name or name.strip() != name:
        raise AutoliverError(f"{where}{what} {name!r} is not a plain name; use letters, digits, '_', '-' and '.'")
    if name in (".", "..") or name.startswith(".") or _BAD_NAME_CHARS.search(name) or len(name) > MAX_NAME_LENGTH:
        raise AutoliverError(f"{where}{what} {name!r} is not a plain name (no folders, no leading dot, no special characters, "
                             f"at most {MAX_NAME_LENGTH} characters); rename it")
    return name


def inside(folder: Path, name: object, what: str = "name", source: str = "") -> Path:
    """``folder / name`` for a plain ``name`` (see :func:`plain_name`)."""
    return Path(folder) / plain_name(name, what, source)


def fold_name(fold: int | str) -> str:
    """The folder name of a fold: ``fold_0`` .. or ``fold_all``."""
    text = str(fold)
    if text.startswith(FOLD_PREFIX):
        text = text[len(FOLD_PREFIX):]
    if text != "all" and not text.isdigit():
        raise UsageError(f"fold must be a number or 'all', got {fold!r}")
    return f"{FOLD_PREFIX}{text}"


def fold_of(folder_name: str) -> str:
    """``fold_3`` -> ``3``."""
    return folder_name[len(FOLD_PREFIX):] if folder_name.startswith(FOLD_PREFIX) else folder_name


@dataclass(frozen=True)
class FoldPaths:
    """``results/<dataset>/<configuration>/fold_<k>/`` and what it holds."""

    root: Path

    @property
    def configuration_dir(self) -> Path:
        return self.root.parent

    @property
    def model_dir(self) -> Path:
        """``results/<dataset>/``: the model folder holding every configuration."""
        return self.root.parent.parent

    @property
    def latest(self) -> Path:
        return self.root / CHECKPOINT_LATEST

    @property
    def best(self) -> Path:
        return self.root / CHECKPOINT_BEST

    @property
    def final(self) -> Path:
        return self.root / CHECKPOINT_FINAL

    @property
    def log(self) -> Path:
        return self.root / TRAIN_LOG

    @property
    def progress(self) -> Path:
        return self.root / PROGRESS_PNG

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def validation(self) -> Path:
        return self.root / VALIDATION

    def validation_case(self, case_id: str, suffix: str) -> Path:
        return inside(self.validation, f"{case_id}{suffix}", "case id")

    def checkpoints(self) -> tuple[Path, ...]:
        return tuple(self.root / n for n in CHECKPOINTS)


@dataclass(frozen=True)
class ModelPaths:
    """A model folder, ``results/<dataset>/`` (or an unpacked model package)."""

    root: Path

    @property
    def plans(self) -> Path:
        return self.root / PLANS

    @property
    def splits(self) -> Path:
        return self.root / SPLITS

    @property
    def inference_plan(self) -> Path:
        return self.root / INFERENCE_PLAN

    def plans_candidates(self) -> tuple[Path, ...]:
        """Where a model folder's plans may be: its own ``plans.json``, else, for a model folder
        at ``<workspace>/results/<dataset>``, ``<workspace>/preprocessed/<dataset>/plans.json``."""
        return (self.plans, self.root.parent.parent / "preprocessed" / self.root.name / PLANS)

    def configuration(self, configuration: str) -> Path:
        return inside(self.root, configuration, "configuration name")

    def fold(self, configuration: str, fold: int | str) -> FoldPaths:
        return FoldPaths(self.configuration(configuration) / fold_name(fold))

    def next_stage(self, configuration: str) -> Path:
        return self.configuration(configuration) / NEXT_STAGE

    def fold_dirs(self, configuration: str | None = None) -> list[Path]:
        """Existing fold folders (of one configuration, or of all), sorted."""
        pattern = f"{configuration or '*'}/{FOLD_PREFIX}*"
        return sorted(p for p in self.root.glob(pattern) if p.is_dir())


@dataclass(frozen=True)
class DatasetPaths:
    """The artefacts of one dataset in a workspace."""

    name: str
    preprocessed: Path
    results: Path

    @property
    def fingerprint(self) -> Path:
        return self.preprocessed / FINGERPRINT

    @property
    def plans(self) -> Path:
        return self.preprocessed / PLANS

    def data(self, data_identifier: str) -> Path:
        return inside(self.preprocessed, data_identifier, "data identifier")

    @property
    def model(self) -> ModelPaths:
        return ModelPaths(self.results)


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    def preprocessed(self, dataset_name: str) -> Path:
        return inside(self.root / "preprocessed", dataset_name, "dataset name")

    def results(self, dataset_name: str) -> Path:
        return inside(self.root / "results", dataset_name, "dataset name")

    @property
    def models(self) -> Path:
        """Installed model packages: ``models/<name>/``, and ``models/.cache/`` for packages
        given to ``predict -m`` directly."""
        return self.root / "models"

    def dataset(self, dataset_name: str) -> DatasetPaths:
        return DatasetPaths(dataset_name, self.preprocessed(dataset_name), self.results(dataset_name))


def _by_id(folder: Path, wanted: int) -> list[Path]:
    if not folder.is_dir():
        return []
    return [c for c in sorted(folder.iterdir()) if c.is_dir() and (m := DATASET_NAME_RE.match(c.name)) and int(m["id"]) == wanted]


def resolve_dataset(spec: str | Path, workspace: Workspace) -> Path:
    """Turn a path, a dataset name or a numeric id into the raw dataset's folder."""
    spec_str = str(spec)
    path = Path(spec_str).expanduser()
    if path.is_dir():
        return path.resolve()
    if "/" not in spec_str and "\\" not in spec_str and spec_str not in (".", "..") and (workspace.raw / spec_str).is_dir():
        return (workspace.raw / spec_str).resolve()
    if spec_str.isdigit():
        matches = _by_id(workspace.raw, int(spec_str))
        if len(matches) == 1:
            return matches[0].resolve()
        if len(matches) > 1:
            raise DatasetError(f"dataset id {spec_str} is ambiguous under {workspace.raw}: {', '.join(m.name for m in matches)}; use the full name")
    raise DatasetError(
        f"dataset {spec_str!r}: not a folder and not found under {workspace.raw}; give the dataset "
        "folder's path, or put it in the workspace's raw/ (see --workspace) and use its name or id"
    )


def dataset_name(spec: str | Path, workspace: Workspace) -> str:
    """The name under which a dataset's artefacts live, from any of its forms: a folder path
    (absolute or relative), a name, or a numeric id (found under raw/, preprocessed/ or
    results/, so artefacts copied without the raw data are still found)."""
    spec_str = str(spec)
    path = Path(spec_str).expanduser()
    if path.is_dir():
        return plain_name(path.resolve().name, "dataset name")
    if "/" not in spec_str and "\\" not in spec_str:
        for area in (workspace.raw, workspace.root / "preprocessed", workspace.root / "results"):
            if spec_str not in (".", "..") and (area / spec_str).is_dir():
                return plain_name(spec_str, "dataset name")
        if spec_str.isdigit():
            for area in (workspace.raw, workspace.root / "preprocessed", workspace.root / "results"):
                matches = _by_id(area, int(spec_str))
                if len(matches) == 1:
                    return matches[0].name
                if len(matches) > 1:
                    raise DatasetError(f"dataset id {spec_str} is ambiguous under {area}: {', '.join(m.name for m in matches)}; use the full name")
    return resolve_dataset(spec, workspace).name
