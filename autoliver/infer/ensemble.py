"""What ``autoliver predict`` runs: one or more configurations (each with its folds) whose
softmax probabilities are averaged with equal weights, and the post-processing to apply.

``load_ensemble`` takes the configurations and folds given (``-c``/``-f``); when neither is
given and the model folder holds ``inference_plan.json`` (written by ``autoliver
find_best_configuration``), it takes that plan's configurations, folds and enabled
post-processing steps, after checking that the plan was made from the same plans.json.
Without either, it takes the first trained configuration and its folds (``load_model``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from autoliver.core.artefacts import PostprocessStep
from autoliver.core.errors import MissingArtefactError, StaleArtefactError, UsageError
from autoliver.core.layout import INFERENCE_PLAN
from autoliver.infer.predictor import Model, find_plans, load_model
from autoliver.io.inference_plan import load_inference_plan
from planning.plans import Plans

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Ensemble:
    models: tuple[Model, ...]
    postprocessing: tuple[PostprocessStep, ...] = ()  # enabled steps of inference_plan.json, in order
    source: str = "arguments"  # where the choice came from: "arguments", "default" or the plan's path

    def __post_init__(self) -> None:
        if not self.models:
            raise UsageError("an ensemble needs at least one model")
        hashes = {m.plans.plans_hash for m in self.models}
        if len(hashes) > 1:
            raise UsageError("the ensemble's models come from different plans")

    @property
    def plans(self) -> Plans:
        return self.models[0].plans

    @property
    def device(self) -> torch.device:
        return self.models[0].device

    @property
    def n_classes(self) -> int:
        return self.models[0].n_classes

    @property
    def configurations(self) -> tuple[str, ...]:
        return tuple(m.configuration.name for m in self.models)

    @property
    def folds(self) -> dict[str, list[str]]:
        """configuration -> fold names (a cascade's previous stage and a tumour stage's liver stage included)."""
        out: dict[str, list[str]] = {}
        todo: list[Model] = list(self.models)
        while todo:
            stage = todo.pop(0)
            out.setdefault(stage.configuration.name, list(stage.fold_names))
            todo += [s for s in (stage.previous, stage.liver) if s is not None]
        return out

    @property
    def data_identifiers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(i for m in self.models for i in m.data_identifiers))

    @property
    def reference_identifier(self) -> str:
        """The grid the probabilities are averaged in: the finest of the members' grids."""
        spacings = self.plans.data_spacings
        own = [m.configuration.data_identifier for m in self.models]
        return min(own, key=lambda i: (spacings[i][0] * spacings[i][1] * spacings[i][2], own.index(i)))

    def describe(self) -> dict:
        """The JSON record of what was used (for the case report)."""
        return {"configurations": list(self.configurations), "folds": self.folds, "source": self.source,
                "postprocessing": [{"name": s.name, "params": dict(s.params)} for s in self.postprocessing],
                "arch": {m.configuration.name: m.arch for m in self.models}}


def read_inference_plan(path: Path, plans: Plans, plans_path: Path):
    """``inference_plan.json`` read and validated, then checked against the plans the models come from."""
    plan = load_inference_plan(path)
    if not plans.hash_matches(plan.plans_hash, plan.configurations):
        raise StaleArtefactError(f"{path}: made for other plans than {plans_path} (plans_hash differs); "
                                 f"run `autoliver find_best_configuration {plans.dataset_name}` again")
    return plan


def load_ensemble(model_dir: str | Path, configurations: Sequence[str] | str | None = None,
                  folds: Sequence[str | int] | None = None, device: str | torch.device = "cpu",
                  precision: str = "auto", use_plan: bool = True, engine: str = "torch") -> Ensemble:
    """The models to predict with (see the module docstring); ``engine`` as for ``load_model``."""
    model_dir = Path(model_dir)
    if isinstance(configurations, str):
        configurations = [configurations]
    configurations = list(dict.fromkeys(configurations or []))
    plan_path = model_dir / INFERENCE_PLAN
    if not configurations and not folds and use_plan and plan_path.is_file():
        plans_path = find_plans(model_dir)
        plan = read_inference_plan(plan_path, Plans.load(plans_path), plans_path)
        models = tuple(load_model(model_dir, c, plan.folds.get(c) or None, device, precision, engine) for c in plan.configurations)
        steps = plan.enabled_steps
        log.info("%s: configurations %s, post-processing %s", plan_path, ", ".join(plan.configurations),
                 ", ".join(s.name for s in steps) or "none")
        return Ensemble(models, steps, str(plan_path))
    if not configurations:
        model = load_model(model_dir, None, folds, device, precision, engine)
        return Ensemble((model,), (), "default" if not folds else "arguments")
    if not model_dir.is_dir():
        raise MissingArtefactError(f"{model_dir}: model folder not found; train one with `autoliver train -d DATASET CONFIG FOLD`")
    return Ensemble(tuple(load_model(model_dir, c, folds, device, precision, engine) for c in configurations), (), "arguments")
