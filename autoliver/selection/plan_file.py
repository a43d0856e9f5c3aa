"""``results/<dataset>/inference_plan.json``: what ``autoliver predict`` runs by default
(configurations, folds, post-processing) and the cross-validation evidence for it.

Written by ``autoliver find_best_configuration``; read by ``autoliver predict`` and
``autoliver postprocess``. Validated on load; every message names the file and the command
that rebuilds it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from autoliver.errors import MissingArtefactError, PlanError
from autoliver.io.atomic import write_json
from autoliver.postprocess.apply import enabled_steps
from planning.plans import CONFIGURATION_NAMES

INFERENCE_PLAN = "inference_plan.json"
INFERENCE_PLAN_SCHEMA = 1


@dataclass(frozen=True)
class InferencePlan:
    dataset: str
    plans_hash: str
    configurations: tuple[str, ...]  # one: a single model; more: equal-weight softmax average
    folds: dict[str, tuple[str, ...]]
    postprocessing: tuple[dict, ...]  # steps in application order (see autoliver.postprocess)
    evidence: dict = field(default_factory=dict)
    created: str = ""
    schema_version: int = INFERENCE_PLAN_SCHEMA

    def to_json(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "dataset": self.dataset,
            "plans_hash": self.plans_hash,
            "configurations": list(self.configurations),
            "folds": {k: list(v) for k, v in self.folds.items()},
            "postprocessing": [dict(s) for s in self.postprocessing],
            "evidence": self.evidence,
            "created": self.created,
        }

    @classmethod
    def from_json(cls, d: object, source: str = INFERENCE_PLAN) -> "InferencePlan":
        dataset = d.get("dataset", "DATASET") if isinstance(d, Mapping) else "DATASET"
        fix = f"run `autoliver find_best_configuration -d {dataset}` to rebuild it"
        if not isinstance(d, Mapping):
            raise PlanError(f"{source}: not a JSON object; {fix}")
        if d.get("schema_version") != INFERENCE_PLAN_SCHEMA:
            raise PlanError(f"{source}: schema_version {d.get('schema_version')!r}, expected {INFERENCE_PLAN_SCHEMA}; {fix}")
        try:
            configurations = tuple(str(c) for c in d["configurations"])
            folds = {str(k): tuple(str(f) for f in v) for k, v in d["folds"].items()}
            steps = tuple(dict(s) for s in d["postprocessing"])
            plan = cls(dataset=str(d["dataset"]), plans_hash=str(d["plans_hash"]), configurations=configurations, folds=folds,
                       postprocessing=steps, evidence=dict(d.get("evidence") or {}), created=str(d.get("created", "")))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PlanError(f"{source}: malformed ({type(exc).__name__}: {exc}); {fix}") from None
        problems = []
        if not configurations:
            problems.append("no configuration")
        problems += [f"unknown configuration {c!r}" for c in configurations if c not in CONFIGURATION_NAMES]
        problems += [f"no folds for {c}" for c in configurations if not folds.get(c)]
        try:
            enabled_steps(steps)
        except ValueError as exc:
            problems.append(str(exc))
        if problems:
            raise PlanError(f"{source}: {'; '.join(problems)}; {fix}")
        return plan


def inference_plan_path(results_dir: str | Path) -> Path:
    return Path(results_dir) / INFERENCE_PLAN


def load_inference_plan(path: str | Path) -> InferencePlan:
    """Read and validate an inference plan (a file, or a results folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = inference_plan_path(path)
    if not path.is_file():
        raise MissingArtefactError(f"{path}: not found; run `autoliver find_best_configuration -d {path.parent.name}` first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PlanError(f"{path}: not valid JSON ({exc}); run `autoliver find_best_configuration -d {path.parent.name}` to rebuild it") from None
    return InferencePlan.from_json(data, str(path))


def write_inference_plan(path: str | Path, plan: InferencePlan) -> Path:
    """Validate, then write atomically."""
    path = Path(path)
    InferencePlan.from_json(plan.to_json(), str(path))
    write_json(path, plan.to_json())
    return path
