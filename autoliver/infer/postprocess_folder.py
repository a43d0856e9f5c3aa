"""``autoliver postprocess``: apply an inference plan's post-processing to a folder of
predictions (the steps themselves live in :mod:`autoliver.postprocess`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from autoliver.core.artefacts import CRF_STEP
from autoliver.core.errors import DatasetError, MissingArtefactError, UsageError
from autoliver.evaluate.case_report import case_report
from autoliver.infer.predictor import find_plans
from autoliver.io.atomic import write_json
from autoliver.io.images import read_image, write_image
from autoliver.io.inference_plan import inference_plan_path, load_inference_plan
from autoliver.io.jsonfile import read_json
from autoliver.postprocess.apply import apply_postprocessing
from autoliver.preprocess.normalise import normalise_ct
from planning.plans import Plans

log = logging.getLogger(__name__)

SEG_SUFFIX = ".nii.gz"


@dataclass
class PostprocessSummary:
    output: Path
    processed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def _updated_report(old: Mapping, seg: np.ndarray, geometry, applied: list[str], seconds: float) -> dict:
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
    in_dir, out_dir = Path(in_dir).expanduser(), Path(out_dir).expanduser()
    if in_dir.resolve() == out_dir.resolve():
        raise UsageError(f"{out_dir}: the output folder must differ from the input folder")
    plan_path = Path(plan_path).expanduser()
    if plan_path.is_dir():
        plan_path = inference_plan_path(plan_path)
    plan = load_inference_plan(plan_path)
    steps = plan.enabled_steps
    cases = sorted(p.name[: -len(SEG_SUFFIX)] for p in in_dir.glob(f"*{SEG_SUFFIX}") if not p.name.startswith("."))
    if not cases:
        raise MissingArtefactError(f"{in_dir}: no <case>{SEG_SUFFIX} label maps; run `autoliver predict` first")
    use_crf = any(s.name == CRF_STEP for s in steps)
    norm = None
    if use_crf:
        no_probs = [c for c in cases if not (in_dir / f"{c}.npz").is_file()]
        if no_probs:
            raise MissingArtefactError(
                f"{plan_path}: enables {CRF_STEP}, which needs the class probabilities, but {in_dir} has no <case>.npz for "
                f"{len(no_probs)} case(s) ({', '.join(no_probs[:3])}); predict again with `autoliver predict ... --save-probabilities`, "
                f"or let `autoliver predict` apply the plan itself")
        if images_dir is None:
            raise UsageError(f"{plan_path}: enables {CRF_STEP}, which needs the CT images; give their folder (--images)")
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
            with np.load(in_dir / f"{case}.npz") as z:
                probs = z["probabilities"].astype(np.float32)
            image = normalise_ct(read_image(_image_path(Path(images_dir), case))[0], norm)
        new = apply_postprocessing(seg, geometry.spacing, steps, probabilities=probs, image=image)
        seconds = time.perf_counter() - t0
        report_path = in_dir / f"{case}.json"
        if report_path.is_file():
            old = read_json(report_path, DatasetError, f"delete it (it is rewritten from {target.name}) or predict the case again")
            write_json(out_dir / f"{case}.json", _updated_report(old, new, geometry, [s.name for s in steps], seconds))
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
    return Plans.load(find_plans(plan_path.parent)).normalisation
