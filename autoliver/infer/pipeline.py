"""The prediction of one case by a model or an ensemble.

    preprocess (crop to body, normalise, resample to every grid the models read)
    -> [ROI: a coarse pass finds the liver's box in the reference grid (autoliver.infer.roi);
       with ``roi="auto"`` only where it costs at most ROI_PAYOFF of the whole-volume pass;
       a box side the predicted liver touches is moved out and the box predicted again]
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
from autoliver.infer.predictor import TILES, Box, Model, crop_box, inference_tiling, model_probabilities, preprocess_for, previous_stage_labels
from autoliver.infer.roi import MARGIN_MM, ROI_PAYOFF, Roi, box_fraction, find_roi, grow_box, roi_costs
from autoliver.infer.sliding_window import argmax_labels
from autoliver.io.images import Geometry
from autoliver.postprocess import apply_postprocessing
from autoliver.preprocess.case import map_back, map_back_probabilities
from autoliver.preprocess.resample import resample_probabilities

log = logging.getLogger(__name__)

ROI_DEFAULT = "auto"
ROI_MODES = ("auto", "on", "off")
TILES_DEFAULT = "auto"
MAX_GROW = 2  # box growths after a coarse pass that cut the liver
PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class CasePrediction:
    seg: np.ndarray  # uint8 (Z, Y, X) in the input's grid
    probabilities: np.ndarray | None  # float16 (n_classes, Z, Y, X) in the input's grid, or None
    timings: dict[str, float]  # seconds per stage
    info: dict  # what was used: configurations, folds, post-processing, ROI, precision


def as_ensemble(model: Model | Ensemble) -> Ensemble:
    return model if isinstance(model, Ensemble) else Ensemble((model,), (), "arguments")


def with_settings(ensemble: Ensemble, precision: str | None = None, tiles: str | None = None, tile_mb: float | None = None) -> Ensemble:
    """The ensemble with every network (cascade and two-stage stages included) at ``precision``
    and with inference ``tiles`` / ``tile_mb`` (``autoliver.infer.predictor``); None keeps a setting."""
    if tiles is not None and tiles not in TILES:
        raise ValueError(f"tiles must be one of {', '.join(TILES)}, got {tiles!r}")
    if tile_mb is not None and not tile_mb > 0:
        raise ValueError(f"tile_mb must be > 0, got {tile_mb}")

    def set_model(m: Model | None) -> Model | None:
        if m is None:
            return None
        changes: dict = {"previous": set_model(m.previous), "liver": set_model(m.liver)}
        if precision is not None:
            changes["autocast"] = autocast_dtype(precision, m.device)
        if tiles is not None:
            changes["tiles"] = tiles
        if tile_mb is not None:
            changes["tile_mb"] = float(tile_mb)
        return replace(m, **changes)

    return replace(ensemble, models=tuple(set_model(m) for m in ensemble.models))


def _apply_postprocessing(ensemble: Ensemble, seg: np.ndarray, probs: torch.Tensor, image: np.ndarray, spacing) -> np.ndarray:

    return apply_postprocessing(seg, tuple(spacing), list(ensemble.postprocessing), probabilities=probs.numpy(),
                                image=np.asarray(image, dtype=np.float32))


def roi_mode(roi: bool | str) -> str:
    """``True`` / ``False`` / one of ROI_MODES -> one of ROI_MODES."""
    mode = {True: "on", False: "off"}.get(roi, roi) if isinstance(roi, bool) else roi
    if mode not in ROI_MODES:
        raise ValueError(f"roi must be one of {', '.join(ROI_MODES)} (or a bool), got {roi!r}")
    return mode


def roi_decision(ensemble: Ensemble, shape, ref: str, tta: bool, step: float) -> dict:
    """Whether a coarse pass pays on a volume of ``shape`` (the reference grid): its cost against
    the accurate pass of the models predicted in that grid, counted from the tiles."""
    models = [m for m in ensemble.models if m.configuration.data_identifier == ref]
    if models[0].previous is not None:  # a cascade's lowres stage is run anyway
        return {"pays": True, "reason": "cascade: the lowres stage gives the box"}
    coarse = roi_costs(models[0], shape, tta, step)[0]
    whole = sum(roi_costs(m, shape, tta, step)[1] for m in models)
    ratio = coarse / whole
    return {"pays": ratio <= ROI_PAYOFF, "coarse_to_whole": round(ratio, 4),
            "reason": f"the coarse pass costs {ratio:.0%} of the whole-volume pass ({'<=' if ratio <= ROI_PAYOFF else '>'} {ROI_PAYOFF:.0%})"}


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


def _box_prediction(ensemble: Ensemble, prepared: dict, region: Roi | None, tta: bool, step: float, margin_mm: float,
                    prev_cache: dict[int, np.ndarray]) -> tuple[torch.Tensor, np.ndarray, Box | None, int]:
    """(probabilities, labels, box, growths): the accurate pass over the ROI's box, the box moved
    out (``grow_box``) while the liver touches a side inside the volume, at most MAX_GROW times."""
    ref = ensemble.reference_identifier
    data, props = prepared[ref]
    box = region.box if region is not None and region.found else None
    grown = 0
    while True:
        probs = ensemble_probabilities(ensemble, prepared, box, tta, step, prev_cache)
        seg = argmax_labels(probs)
        if box is None or grown >= MAX_GROW:
            return probs, seg, box, grown
        wider = grow_box(box, seg, data.shape, props.spacing, margin_mm)
        if wider == box:
            return probs, seg, box, grown
        log.info("ROI: the liver reaches the box %s; predicting %s", box, wider)
        box, grown = wider, grown + 1
        del probs, seg


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
                 save_probabilities: bool = False, prepared: dict | None = None, roi: bool | str = ROI_DEFAULT,
                 roi_margin_mm: float = MARGIN_MM, precision: str | None = None, tiles: str | None = None,
                 tile_mb: float | None = None) -> CasePrediction:
    """Segment one (Z, Y, X) CT in HU; labels in ``geometry``'s grid (module docstring).

    ``prepared`` = ``preprocess_for(model, image, geometry)`` computed ahead (a prefetch
    thread); ``precision`` overrides the precision the models were loaded with; ``roi``: "on",
    "off" or "auto" (on where the coarse pass pays: ``roi_decision``), or a bool; ``tiles`` /
    ``tile_mb``: 3d inference tiles ("auto": the fewest, largest tiles within ``tile_mb`` of
    activations; "patch": the training patch), None: as the models were loaded.
    """
    mode = roi_mode(roi)
    ensemble = as_ensemble(model)
    if precision is not None or tiles is not None or tile_mb is not None:
        ensemble = with_settings(ensemble, precision, tiles, tile_mb)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if prepared is None:
        prepared = preprocess_for(ensemble, image, geometry)
        timings["preprocess_s"] = time.perf_counter() - t0
    ref = ensemble.reference_identifier
    data, props = prepared[ref]
    prev_cache: dict[int, np.ndarray] = {}
    region = None
    decision = roi_decision(ensemble, data.shape, ref, tta, step) if mode == "auto" else None
    with torch.inference_mode():
        if mode == "on" or (decision is not None and decision["pays"]):
            region = _roi(ensemble, prepared, ref, roi_margin_mm, tta, step, prev_cache)
            timings["roi_s"] = region.seconds
        elif decision is not None:
            log.info("ROI skipped: %s", decision["reason"])
        t1 = time.perf_counter()
        probs, seg_box, box, grown = _box_prediction(ensemble, prepared, region, tta, step, roi_margin_mm, prev_cache)
        timings["network_s"] = time.perf_counter() - t1
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
            "tiles": _tiles_info(ensemble, data.shape if box is None else [b - a for a, b in box], step),
            "roi": _roi_info(mode, decision, region, box, data.shape, roi_margin_mm, ref, grown)}
    return CasePrediction(seg, full_probs, timings, info)


def _roi_info(mode: str, decision: dict | None, region: Roi | None, box: Box | None, shape, margin_mm: float, ref: str,
              grown: int) -> dict | None:
    """The report's ROI record: None when off; else what was decided and the box predicted."""
    if mode == "off":
        return None
    info: dict = {"mode": mode, "used": region is not None}
    if decision is not None:
        info["decision"] = decision
    if region is not None:
        final = box if box is not None else region.box
        info.update(found=region.found, box=[list(b) for b in final], fraction=round(box_fraction(final, shape), 4),
                    margin_mm=margin_mm, grid=ref, grown=grown)
    return info


def _tiles_info(ensemble: Ensemble, shape, step: float) -> dict:
    """The report's tiling record of the reference grid's first model: the mode and, for "auto", the tile."""
    m = ensemble.models[0]
    tiling = inference_tiling(m, shape, step)
    if tiling is None:
        return {"mode": m.tiles if m.configuration.network_dims == 3 else "patch", "tile": list(m.configuration.patch_size)}
    return {"mode": "auto", "tile": list(tiling[0]), "tiles": int(np.prod([len(st) for st in tiling[1]])), "tile_mb": m.tile_mb}
