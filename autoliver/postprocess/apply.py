"""Apply the post-processing steps of an inference plan (``inference_plan.json``'s
"postprocessing" list) to one label map, or to a folder of predictions.

Steps run in list order, enabled ones only. ``dense_crf`` refines the class probabilities
(C, Z, Y, X) inside the predicted liver's bounding box (grown by ``CRF_MARGIN_MM``) and
replaces the labels there by the refined argmax, so it must come before the label-only steps
(``find_best_configuration`` writes it first). Label-only steps need only the labels and the
spacing, in whatever grid the labels are in: their parameters are in mm and mm³.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping, Sequence
from types import ModuleType

import numpy as np

from autoliver.core.artefacts import CRF_STEP, PostprocessStep, enabled_steps
from autoliver.core.geometry import mask_box_mm
from autoliver.core.labels import liver_mask
from autoliver.postprocess.components import largest_liver_component, min_tumour_volume, tumour_inside_liver

log = logging.getLogger(__name__)

LABEL_STEPS = {
    "largest_liver_component": lambda seg, spacing, p: largest_liver_component(seg, then_liver=bool(p.get("then_liver", False))),
    "tumour_inside_liver": lambda seg, spacing, p: tumour_inside_liver(seg, spacing, float(p.get("dilation_mm", 5.0))),
    "min_tumour_volume": lambda seg, spacing, p: min_tumour_volume(seg, spacing, float(p["min_volume_mm3"])),
}
CRF_MARGIN_MM = 10.0


def crf_module() -> ModuleType | None:
    """``autoliver.postprocess.crf`` (``dense_crf``, ``CRF_PARAM_GRID``), or None when absent."""
    try:
        return importlib.import_module("autoliver.postprocess.crf")
    except ImportError:
        return None


def liver_box_slices(seg: np.ndarray, spacing: Sequence[float], margin_mm: float = CRF_MARGIN_MM) -> tuple[slice, ...] | None:
    """The bounding box of the liver (labels 1 + 2) grown by ``margin_mm``, as slices; None without liver."""
    return mask_box_mm(liver_mask(seg), spacing, margin_mm)


def crf_refine(probabilities: np.ndarray, image: np.ndarray, spacing: Sequence[float], params: Mapping,
               seg: np.ndarray | None = None) -> np.ndarray:
    """Labels after the dense CRF: ``seg`` (default the argmax) with the liver's box replaced by
    the argmax of ``dense_crf`` on the box's probabilities and image."""
    module = crf_module()
    if module is None:
        raise ValueError(f"the plan enables {CRF_STEP} but autoliver.postprocess.crf is not available")
    if probabilities.ndim != 4 or probabilities.shape[1:] != image.shape:
        raise ValueError(f"{CRF_STEP}: probabilities {probabilities.shape} (C, Z, Y, X) do not match the image {image.shape} (Z, Y, X)")
    out = np.asarray(probabilities.argmax(0), dtype=np.uint8) if seg is None else np.array(seg, dtype=np.uint8, copy=True)
    sl = liver_box_slices(out, spacing)
    if sl is None:
        return out
    refined = module.dense_crf(np.ascontiguousarray(probabilities[(slice(None), *sl)], dtype=np.float32),
                               np.ascontiguousarray(image[sl], dtype=np.float32), tuple(float(s) for s in spacing),
                               **{**dict(params), "roi": None})  # already cropped to the liver box
    out[sl] = np.asarray(refined).argmax(0).astype(np.uint8)
    return out


def apply_label_step(seg: np.ndarray, spacing: Sequence[float], name: str, params: Mapping) -> np.ndarray:
    if name not in LABEL_STEPS:
        raise ValueError(f"unknown label-only post-processing step {name!r}; known: {', '.join(LABEL_STEPS)}")
    return LABEL_STEPS[name](seg, spacing, params)


def apply_postprocessing(seg: np.ndarray, spacing: Sequence[float], steps: Sequence[PostprocessStep | Mapping],
                         probabilities: np.ndarray | None = None, image: np.ndarray | None = None) -> np.ndarray:
    """Apply the enabled ``steps`` to a (Z, Y, X) label map; returns a new uint8 map.

    ``dense_crf`` needs ``probabilities`` (C, Z, Y, X) and the normalised ``image`` (Z, Y, X) in
    the label map's grid, and raises ValueError naming what is missing otherwise.
    """
    if seg.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) label map, got shape {seg.shape}")
    out = np.asarray(seg, dtype=np.uint8)
    for step in enabled_steps(steps):
        params = step.params
        if step.name == CRF_STEP:
            missing = [n for n, v in (("probabilities", probabilities), ("image", image)) if v is None]
            if missing:
                raise ValueError(f"{CRF_STEP} needs the class probabilities and the normalised image; missing: {', '.join(missing)}")
            out = crf_refine(probabilities, image, spacing, params, seg=out)
        else:
            out = apply_label_step(out, spacing, step.name, params)
    return out if out is not seg else np.array(out, copy=True)
