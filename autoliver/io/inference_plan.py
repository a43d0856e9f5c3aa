"""Reading and writing ``results/<dataset>/inference_plan.json`` (the type lives in
:mod:`autoliver.core.artefacts`). Written by ``autoliver find_best_configuration``; read by
``autoliver predict`` and ``autoliver postprocess``."""

from __future__ import annotations

from pathlib import Path

from autoliver.core.artefacts import InferencePlan
from autoliver.core.errors import MissingArtefactError, PlanError
from autoliver.core.layout import INFERENCE_PLAN
from autoliver.io.atomic import write_json
from autoliver.io.jsonfile import read_json


def inference_plan_path(results_dir: str | Path) -> Path:
    return Path(results_dir) / INFERENCE_PLAN


def load_inference_plan(path: str | Path) -> InferencePlan:
    """Read and validate an inference plan (a file, or a results folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = inference_plan_path(path)
    fix = f"run `autoliver find_best_configuration -d {path.parent.name}`"
    if not path.is_file():
        raise MissingArtefactError(f"{path}: not found; {fix} first")
    data = read_json(path, error=PlanError, fix=f"{fix} to rebuild it")
    return InferencePlan.from_json(data, str(path))


def write_inference_plan(path: str | Path, plan: InferencePlan) -> Path:
    """Validate, then write atomically."""
    path = Path(path)
    InferencePlan.from_json(plan.to_json(), str(path))
    write_json(path, plan.to_json())
    return path
