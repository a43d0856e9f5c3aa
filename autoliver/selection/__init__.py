"""Model selection on cross-validation: which configuration or ensemble to predict with, and
which post-processing steps to apply (``autoliver find_best_configuration``), recorded in
``results/<dataset>/inference_plan.json``."""

from autoliver.core.artefacts import InferencePlan
from autoliver.core.layout import INFERENCE_PLAN
from autoliver.io.inference_plan import inference_plan_path, load_inference_plan, write_inference_plan
from autoliver.selection.select import SelectionResult, find_best_configuration, postprocessing_table

__all__ = [
    "INFERENCE_PLAN",
    "InferencePlan",
    "SelectionResult",
    "find_best_configuration",
    "inference_plan_path",
    "load_inference_plan",
    "postprocessing_table",
    "write_inference_plan",
]
