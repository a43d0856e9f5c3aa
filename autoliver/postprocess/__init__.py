"""Post-processing of predicted label maps, decided per dataset on cross-validation
(``autoliver find_best_configuration``) and applied by ``autoliver predict`` and
``autoliver postprocess`` (its folder runner is ``autoliver.infer.postprocess_folder``).

``apply_postprocessing(seg, spacing, steps, probabilities=None, image=None)`` applies the
"postprocessing" list of ``inference_plan.json``; the label-only steps are pure functions in
``components``; the dense CRF lives in ``crf``.
"""

from autoliver.core.artefacts import STEP_NAMES
from autoliver.postprocess.apply import apply_postprocessing
from autoliver.postprocess.components import largest_component, largest_liver_component, min_tumour_volume, tumour_inside_liver

__all__ = [
    "STEP_NAMES",
    "apply_postprocessing",
    "largest_component",
    "largest_liver_component",
    "min_tumour_volume",
    "tumour_inside_liver",
]
