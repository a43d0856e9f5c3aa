"""Loading a dataset's ``plans.json`` with a message that names the command that makes it."""

from __future__ import annotations

from autoliver.core.errors import MissingArtefactError, PlanError
from autoliver.core.layout import DatasetPaths
from autoliver.io.jsonfile import read_json
from planning.plans import Plans


def load_plans(paths: DatasetPaths) -> Plans:
    """The dataset's plans; MissingArtefactError / PlanError naming the file and the fix."""
    fix = f"run `autoliver plan_and_preprocess {paths.name}`"
    if not paths.plans.is_file():
        raise MissingArtefactError(f"{paths.plans}: not found; {fix} first")
    read_json(paths.plans, error=PlanError, fix=f"{fix} --overwrite to rebuild it")  # a broken file gets one clear message
    plans = Plans.load(paths.plans)
    if not plans.configurations:
        raise PlanError(f"{paths.plans}: holds no configuration; {fix} --overwrite to rebuild it")
    return plans
