"""Model selection on cross-validation: which configuration or ensemble to predict with, and
which post-processing steps to apply (``autoliver find_best_configuration``), recorded in
``results/<dataset>/inference_plan.json``."""

from autoliver.selection.plan_file import INFERENCE_PLAN, InferencePlan, inference_plan_path, load_inference_plan, write_inference_plan
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
