"""The prediction of one case by a model or an ensemble.

    preprocess (crop to body, normalise, resample to every grid the models read)
    -> [ROI: a coarse pass finds the liver's box in the reference grid (autoliver.infer.roi)]
    -> each configuration's fold-averaged softmax over the box (a cascade first runs its
       lowres stage on the whole volume), averaged over configurations with equal weights;
       a member in another grid is resampled to the reference grid (the finest)
    -> argmax (uint8) -> post-processing from inference_plan.json, in the preprocessed grid
       (the CRF needs the probabilities and the image there)
    -> the label map pasted into the preprocessed grid (background outside the box)
       -> ``map_back`` to the input's exact grid

The only full-resolution (input grid) arrays are the uint8 label map and, on request, the
float16 probabilities (mapped back class by class, only where the box reaches).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from autoliver.infer.ensemble import Ensemble
from autoliver.infer.precision import autocast_dtype
from autoliver.infer.predictor import Model, crop_box, model_probabilities, preprocess_for, previous_stage_labels
from autoliver.infer.roi import MARGIN_MM, Roi, find_roi
from autoliver.infer.sliding_window import argmax_labels
from autoliver.io.images import Geometry
from autoliver.postprocess import apply_postprocessing
from autoliver.preprocess.case import map_back, map_back_probabilities
from autoliver.preprocess.resample import resample_probabilities

log = logging.getLogger(__name__)

ROI_DEFAULT = True
PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class CasePrediction:
    seg: np.ndarray  # uint8 (Z, Y, X) in the input's grid
    probabilities: np.ndarray | None  # float16 (n_classes, Z, Y, X) in the input's grid, or None
    timings: dict[str, float]  # seconds per stage
    info: dict  # what was used: configurations, folds, post-processing, ROI, precision


def as_ensemble(model: Model | Ensemble) -> Ensemble:
    return model if isinstance(model, Ensemble) else Ensemble((model,), (), "arguments")


def with_precision(ensemble: Ensemble, precision: str) -> Ensemble:
    """The ensemble with every network (cascade stages included) at ``precision``."""
    def set_model(m: Model | None) -> Model | None:
        if m is None:
            return None
        return replace(m, autocast=autocast_dtype(precision, m.device), previous=set_model(m.previous))

    return replace(ensemble, models=tuple(set_model(m) for m in ensemble.models))


def _apply_postprocessing(ensemble: Ensemble, seg: np.ndarray, probs: torch.Tensor, image: np.ndarray, spacing) -> np.ndarray:

    return apply_postprocessing(seg, tuple(spacing), list(ensemble.postprocessing), probabilities=probs.numpy(),
                                image=np.asarray(image, dtype=np.float32))


def _roi(ensemble: Ensemble, prepared: dict, ref: str, margin_mm: float, tta: bool, step: float,
         prev_cache: dict[int, np.ndarray]) -> Roi:
    i, first = next((i, m) for i, m in enumerate(ensemble.models) if m.configuration.data_identifier == ref)
    data = prepared[ref][0]
    if first.previous is not None:  # the cascade's lowres stage is the coarse pass
        t0 = time.perf_counter()
        prev_cache[i] = previous_stage_labels(first, prepared, tta, step)
        roi = find_roi(first, data, margin_mm, labels=prev_cache[i])
        return replace(roi, seconds=time.perf_counter() - t0)
    return find_roi(first, data, margin_mm)


def ensemble_probabilities(ensemble: Ensemble, prepared: dict, box, tta: bool = True, step: float = 0.5,
                           prev_cache: dict[int, np.ndarray] | None = None) -> torch.Tensor:
    """Mean softmax (n_classes, *box shape) float32 of the ensemble's models over ``box`` of the
    reference grid."""
    ref = ensemble.reference_identifier
    shape = prepared[ref][0].shape
    prev_cache = prev_cache or {}
    total = None
    with torch.inference_mode():
        for i, m in enumerate(ensemble.models):
            if m.configuration.data_identifier == ref:
                p = model_probabilities(m, prepared, box, tta, step, prev_labels=prev_cache.get(i))
            else:  # a coarser grid: predicted whole, resampled to the reference grid, cropped
                whole = model_probabilities(m, prepared, None, tta, step).numpy()
                p = torch.from_numpy(np.ascontiguousarray(crop_box(resample_probabilities(whole, shape), box)))
                del whole
            total = p if total is None else total.add_(p)
            del p
        if len(ensemble.models) > 1:
            total /= len(ensemble.models)
    return total


def predict_case(model: Model | Ensemble, image: np.ndarray | None, geometry: Geometry, tta: bool = True, step: float = 0.5,
                 save_probabilities: bool = False, prepared: dict | None = None, roi: bool = ROI_DEFAULT,
                 roi_margin_mm: float = MARGIN_MM, precision: str | None = None) -> CasePrediction:
    """Segment one (Z, Y, X) CT in HU; labels in ``geometry``'s grid (module docstring).

    ``prepared`` = ``preprocess_for(model, image, geometry)`` computed ahead (a prefetch
    thread); ``precision`` overrides the precision the models were loaded with.
    """
    ensemble = as_ensemble(model)
    if precision is not None:
        ensemble = with_precision(ensemble, precision)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if prepared is None:
        prepared = preprocess_for(ensemble, image, geometry)
        timings["preprocess_s"] = time.perf_counter() - t0
    ref = ensemble.reference_identifier
    data, props = prepared[ref]
    prev_cache: dict[int, np.ndarray] = {}
    region = None
    with torch.inference_mode():
        if roi:
            region = _roi(ensemble, prepared, ref, roi_margin_mm, tta, step, prev_cache)
            timings["roi_s"] = region.seconds
        box = region.box if region is not None else None
        t1 = time.perf_counter()
        probs = ensemble_probabilities(ensemble, prepared, box, tta, step, prev_cache)
        timings["network_s"] = time.perf_counter() - t1
    t_arg = time.perf_counter()
    seg_box = argmax_labels(probs)
    timings["argmax_s"] = time.perf_counter() - t_arg
    if ensemble.postprocessing:
        t2 = time.perf_counter()
        seg_box = _apply_postprocessing(ensemble, seg_box, probs, crop_box(data, box), props.spacing)
        timings["postprocess_s"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    if box is None:
        seg_pre = seg_box
    else:
        seg_pre = np.zeros(data.shape, dtype=np.uint8)
        crop_box(seg_pre, box)[...] = seg_box
    seg = map_back(seg_pre, props)
    full_probs = map_back_probabilities(probs.numpy(), props, box, dtype=np.float16) if save_probabilities else None
    timings["export_s"] = time.perf_counter() - t3
    if seg.shape != tuple(geometry.shape):  # map_back guarantees it; a mismatch is a bug
        raise RuntimeError(f"label map shape {seg.shape} differs from the input's {geometry.shape}")
    precisions = sorted({PRECISION_NAMES.get(m.autocast, str(m.autocast)) for m in ensemble.models})
    info = {**ensemble.describe(), "precision": precisions[0] if len(precisions) == 1 else precisions,
            "roi": None if region is None else {"found": region.found, "box": [list(b) for b in region.box],
                                                "fraction": round(region.fraction, 4), "margin_mm": roi_margin_mm,
                                                "grid": ref}}
    return CasePrediction(seg, full_probs, timings, info)
