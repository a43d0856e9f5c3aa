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
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
from tqdm import tqdm

from autoliver.errors import MissingArtefactError
from autoliver.io.atomic import write_json
from autoliver.postprocess.components import largest_liver_component, min_tumour_volume, tumour_inside_liver
from planning.crop import bbox_of

log = logging.getLogger(__name__)

CRF_STEP = "dense_crf"
LABEL_STEPS = {
    "largest_liver_component": lambda seg, spacing, p: largest_liver_component(seg, then_liver=bool(p.get("then_liver", False))),
    "tumour_inside_liver": lambda seg, spacing, p: tumour_inside_liver(seg, spacing, float(p.get("dilation_mm", 5.0))),
    "min_tumour_volume": lambda seg, spacing, p: min_tumour_volume(seg, spacing, float(p["min_volume_mm3"])),
}
STEP_NAMES = (CRF_STEP, *LABEL_STEPS)
CRF_MARGIN_MM = 10.0
SEG_SUFFIX = ".nii.gz"


def crf_module() -> ModuleType | None:
    """``autoliver.postprocess.crf`` (``dense_crf``, ``CRF_PARAM_GRID``), or None when absent."""
    try:
        return importlib.import_module("autoliver.postprocess.crf")
    except ImportError:
        return None


def enabled_steps(steps: Sequence[Mapping]) -> list[Mapping]:
    """The enabled steps, checked: known names, params a mapping, dense_crf before label steps."""
    out = []
    for i, step in enumerate(steps):
        if not isinstance(step, Mapping) or step.get("name") not in STEP_NAMES:
            raise ValueError(f"post-processing step {i}: expected {{'name': one of {', '.join(STEP_NAMES)}, 'enabled', 'params'}}, got {step!r}")
        if not isinstance(step.get("params", {}), Mapping):
            raise ValueError(f"post-processing step {i} ({step['name']}): params must be a mapping, got {step.get('params')!r}")
        if step.get("enabled", False):
            if step["name"] == CRF_STEP and out:
                raise ValueError(f"post-processing step {i}: {CRF_STEP} must come before the label-only steps ({', '.join(s['name'] for s in out)})")
            out.append(step)
    return out


def liver_box_slices(seg: np.ndarray, spacing: Sequence[float], margin_mm: float = CRF_MARGIN_MM) -> tuple[slice, ...] | None:
    """The bounding box of labels > 0 grown by ``margin_mm``, as slices; None without liver."""
    box = bbox_of(seg > 0)
    if box is None:
        return None
    pad = [int(np.ceil(margin_mm / float(s))) for s in spacing]
    return tuple(slice(max(0, lo - p), min(n, hi + p)) for (lo, hi), p, n in zip(box, pad, seg.shape))


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


def apply_postprocessing(seg: np.ndarray, spacing: Sequence[float], steps: Sequence[Mapping],
                         probabilities: np.ndarray | None = None, image: np.ndarray | None = None) -> np.ndarray:
    """Apply the enabled ``steps`` to a (Z, Y, X) label map; returns a new uint8 map.

    ``dense_crf`` needs ``probabilities`` (C, Z, Y, X) and the normalised ``image`` (Z, Y, X) in
    the label map's grid, and raises ValueError naming what is missing otherwise.
    """
    if seg.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) label map, got shape {seg.shape}")
    out = np.asarray(seg, dtype=np.uint8)
    for step in enabled_steps(steps):
        params = step.get("params", {}) or {}
        if step["name"] == CRF_STEP:
            missing = [n for n, v in (("probabilities", probabilities), ("image", image)) if v is None]
            if missing:
                raise ValueError(f"{CRF_STEP} needs the class probabilities and the normalised image; missing: {', '.join(missing)}")
            out = crf_refine(probabilities, image, spacing, params, seg=out)
        else:
            out = apply_label_step(out, spacing, step["name"], params)
    return out if out is not seg else np.array(out, copy=True)


@dataclass
class PostprocessSummary:
    output: Path
    processed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def _updated_report(old: Mapping, seg: np.ndarray, geometry, applied: list[str], seconds: float) -> dict:
    from autoliver.report.case_report import case_report

    timings = {**(old.get("runtime_s") or {}), "postprocess_s": seconds}
    new = case_report(seg, geometry, configuration=old.get("configuration"), folds=old.get("folds") or (),
                      version=old.get("autoliver_version"), timings=timings)
    kept = {k: v for k, v in old.items() if k not in new}
    return {**new, **kept, "postprocessing": applied}


def postprocess_folder(in_dir: str | Path, out_dir: str | Path, plan_path: str | Path, images_dir: str | Path | None = None,
                       overwrite: bool = False, progress: bool = True) -> PostprocessSummary:
    """Apply ``plan_path``'s post-processing to every ``<case>.nii.gz`` of ``in_dir``.

    Writes ``out_dir/<case>.nii.gz`` (the input's geometry) and, when ``in_dir/<case>.json``
    exists, the report recomputed for the new labels. An enabled ``dense_crf`` needs
    ``in_dir/<case>.npz`` (``autoliver predict --save-probabilities``) and the CT in
    ``images_dir`` (``<case>.nii.gz`` or ``<case>_0000.nii.gz``), normalised with the plans.
    """
    from autoliver.io.images import read_image, write_image
    from autoliver.selection.plan_file import inference_plan_path, load_inference_plan

    in_dir, out_dir = Path(in_dir).expanduser(), Path(out_dir).expanduser()
    if in_dir.resolve() == out_dir.resolve():
        raise ValueError(f"{out_dir}: the output folder must differ from the input folder")
    plan_path = Path(plan_path).expanduser()
    if plan_path.is_dir():
        plan_path = inference_plan_path(plan_path)
    plan = load_inference_plan(plan_path)
    steps = enabled_steps(plan.postprocessing)
    cases = sorted(p.name[: -len(SEG_SUFFIX)] for p in in_dir.glob(f"*{SEG_SUFFIX}") if not p.name.startswith("."))
    if not cases:
        raise MissingArtefactError(f"{in_dir}: no <case>{SEG_SUFFIX} label maps; run `autoliver predict` first")
    use_crf = any(s["name"] == CRF_STEP for s in steps)
    norm = None
    if use_crf:
        no_probs = [c for c in cases if not (in_dir / f"{c}.npz").is_file()]
        if no_probs:
            raise MissingArtefactError(
                f"{plan_path}: enables {CRF_STEP}, which needs the class probabilities, but {in_dir} has no <case>.npz for "
                f"{len(no_probs)} case(s) ({', '.join(no_probs[:3])}); predict again with `autoliver predict ... --save-probabilities`, "
                f"or let `autoliver predict` apply the plan itself")
        if images_dir is None:
            raise ValueError(f"{plan_path}: enables {CRF_STEP}, which needs the CT images; give their folder (--images)")
        norm = _plans_normalisation(Path(plan_path))
    summary = PostprocessSummary(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for case in tqdm(cases, desc="postprocess", unit="case", disable=not progress):
        target = out_dir / f"{case}{SEG_SUFFIX}"
        if target.exists() and not overwrite:
            summary.skipped.append(case)
            continue
        t0 = time.perf_counter()
        seg, geometry = read_image(in_dir / f"{case}{SEG_SUFFIX}", dtype=np.uint8)
        probs = image = None
        if use_crf:
            from autoliver.preprocess.normalise import normalise_ct

            with np.load(in_dir / f"{case}.npz") as z:
                probs = z["probabilities"].astype(np.float32)
            image = normalise_ct(read_image(_image_path(Path(images_dir), case))[0], norm)
        new = apply_postprocessing(seg, geometry.spacing, steps, probabilities=probs, image=image)
        seconds = time.perf_counter() - t0
        report_path = in_dir / f"{case}.json"
        if report_path.is_file():
            old = json.loads(report_path.read_text(encoding="utf-8"))
            write_json(out_dir / f"{case}.json", _updated_report(old, new, geometry, [s["name"] for s in steps], seconds))
        write_image(target, new, geometry)
        summary.processed.append(case)
        summary.seconds[case] = seconds
        log.info("%s: %s (%.2f s)", case, target, seconds)
    return summary


def _image_path(images_dir: Path, case: str) -> Path:
    for name in (f"{case}_0000{SEG_SUFFIX}", f"{case}{SEG_SUFFIX}"):
        if (images_dir / name).is_file():
            return images_dir / name
    raise MissingArtefactError(f"{images_dir}: no image {case}_0000{SEG_SUFFIX} or {case}{SEG_SUFFIX} for the CRF")


def _plans_normalisation(plan_path: Path):
    from autoliver.infer.predictor import find_plans
    from planning.plans import Plans

    return Plans.load(find_plans(plan_path.parent)).normalisation
