"""Evaluate a folder of predicted label maps against a folder of reference label maps.

Files are paired by case id: the file name without its image suffix (``<case>.nii.gz`` from
``autoliver predict`` against ``<case>.nii.gz`` of a labelsTr folder). LiTS names pair too:
``segmentation-N`` (reference) with ``volume-N`` (prediction of that volume), and
``test-segmentation-N`` with ``test-volume-N``; in a folder holding both ``volume-N`` and
``segmentation-N`` (the LiTS training folder) the ``volume-N`` images are ignored.

Before any voxel is read, every pair's geometry (shape, spacing, origin, direction, within the
validation tolerances) is compared and every mismatch is reported at once, naming both files.
A reference case without a prediction is an error listing every such case, unless
``missing="empty"``, which scores it as an empty prediction. Predictions without a reference
are ignored (logged).

Per case and structure (liver = labels 1 + 2, tumour = label 2): the overlap metrics of
``overlap.py``, the surface metrics of ``surface.py`` (mm), volumes (ml); the tumour lesion
detection of ``detection.py``; the tumour burden (tumour volume / liver volume, 0 when the
liver is empty). Summary: per-case means (NaN cases left out), global Dice (summed
intersections over summed volumes), pooled detection precision / recall, and the burden's RMSE
and maximum absolute error over cases. Outputs: ``evaluation.csv`` (one row per case) and
``evaluation.json`` (see the project's contracts), NaN written as empty / null.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoliver.core.errors import DatasetError, UsageError
from autoliver.core.labels import STRUCTURES, label_value_problems, liver_mask, tumour_mask
from autoliver.core.parallel import parallel_map
from autoliver.evaluate.detection import detect_lesions, detection_summary
from autoliver.evaluate.overlap import OverlapCounts, dice, overlap_counts, overlap_metrics
from autoliver.evaluate.surface import bounding_box, surface_metrics
from autoliver.io.atomic import write_bytes, write_json
from autoliver.io.images import image_suffix, read_header, read_image
from autoliver.io.nifti_raw import nifti_nonfinite_count
from autoliver.io.validate import Tolerances, geometry_mismatch

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CASE_METRICS = ("dice", "iou", "voe", "rvd", "assd_mm", "mssd_mm", "hd95_mm", "precision", "recall", "f1",
                "accuracy", "volume_ref_ml", "volume_pred_ml")
DETECTION_COLUMNS = {"n_lesions_ref": "n_ref", "n_lesions_pred": "n_pred", "tp_overlap": "tp_overlap", "tp_iou50": "tp_iou50"}
CSV_COLUMNS = (["case"] + [f"{s}_{m}" for s in STRUCTURES for m in CASE_METRICS] + list(DETECTION_COLUMNS)
               + ["burden_ref", "burden_pred"])
_LITS_RE = re.compile(r"^(?P<prefix>test-)?(?P<kind>segmentation|volume)-(?P<n>\d+)$")


@dataclass(frozen=True)
class CasePair:
    case: str
    reference: Path
    prediction: Path | None  # None: scored as an empty prediction


def read_label_map(path: Path):
    """(uint8 (Z, Y, X) labels, Geometry) of a label file; DatasetError if its values are not 0/1/2."""
    array, geometry = read_image(path)
    problems = label_value_problems(Path(path), array)
    nonfinite = nifti_nonfinite_count(path) if np.issubdtype(array.dtype, np.floating) else None
    if nonfinite:  # ITK reads NaN/Inf as 0: only the stored bytes show them
        problems.append(f"{path}: label map holds {nonfinite} NaN/Inf voxels (read as 0); labels must be integers: re-export it as uint8")
    if problems:
        raise DatasetError(problems)
    return array.astype(np.uint8, copy=False), geometry


def _lits_kind(case: str) -> str | None:
    m = _LITS_RE.match(case)
    return m["kind"] if m else None


def _pair_key(case: str) -> str:
    m = _LITS_RE.match(case)
    return f"{m['prefix'] or ''}volume-{m['n']}" if m else case


def label_files(folder: Path) -> dict[str, Path]:
    """{pairing key: file} of the image files directly in ``folder`` (see the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder; give the folder holding the label maps (<case>.nii.gz)")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        suffix = image_suffix(path)
        if path.name.startswith(".") or not path.is_file() or suffix is None:
            continue
        case = path.name[: -len(suffix)]
        key = _pair_key(case)
        if key in found:
            kinds = (_lits_kind(case), _lits_kind(found[key].name[: -len(image_suffix(found[key]))]))
            if set(kinds) == {"segmentation", "volume"}:  # LiTS training folder: keep the label map
                if kinds[0] == "segmentation":
                    found[key] = path
                continue
            raise UsageError(f"{folder}: case {key!r} given twice ({found[key].name} and {path.name}); keep one")
        found[key] = path
    if not found:
        raise UsageError(f"{folder}: no label maps (NIfTI, NRRD, MHA) found")
    return found


def pair_cases(reference_dir: Path, prediction_dir: Path, missing: str = "error") -> list[CasePair]:
    """Pair reference and prediction files by case; ``missing``: "error" or "empty"."""
    if missing not in ("error", "empty"):
        raise UsageError(f"missing must be 'error' or 'empty', got {missing!r}")
    refs, preds = label_files(reference_dir), label_files(prediction_dir)
    absent = sorted(set(refs) - set(preds))
    if absent and missing == "error":
        raise DatasetError([f"{prediction_dir}: no prediction for reference {refs[c]} (case {c})" for c in absent]
                           + ["predict the missing case(s), or score them as empty predictions (--missing-as-empty; missing=\"empty\" in Python)"])
    extra = sorted(set(preds) - set(refs))
    if extra:
        log.warning("%d prediction(s) without a reference ignored: %s", len(extra), ", ".join(extra[:10]))
    return [CasePair(c, refs[c], preds.get(c)) for c in sorted(refs)]


def geometry_problems(pairs: list[CasePair], tol: Tolerances = Tolerances()) -> list[str]:
    """Every geometry mismatch between paired files (headers only)."""
    problems = []
    for pair in pairs:
        if pair.prediction is None:
            continue
        ref_geom, _, _ = read_header(pair.reference)
        pred_geom, _, _ = read_header(pair.prediction)
        if ref_geom is None or pred_geom is None:
            bad = pair.reference if ref_geom is None else pair.prediction
            problems.append(f"{bad}: not a 3D volume; label maps must be 3D (paired with {pair.prediction if bad == pair.reference else pair.reference})")
            continue
        problems += geometry_mismatch(pair.reference, ref_geom, pair.prediction, pred_geom, tol)
    return problems


def _structure_entry(pred: np.ndarray, ref: np.ndarray, labels: tuple[int, ...], spacing, total: int) -> dict:
    pm, rm = (liver_mask(pred), liver_mask(ref)) if labels == STRUCTURES["liver"] else (pred == labels[0], ref == labels[0])
    counts = overlap_counts(pm, rm, total=total)
    ml = float(np.prod(spacing)) / 1000.0
    return {**overlap_metrics(counts), **surface_metrics(pm, rm, spacing),
            "volume_ref_ml": counts.n_ref * ml, "volume_pred_ml": counts.n_pred * ml,
            "tp": counts.tp, "fp": counts.fp, "fn": counts.fn}


def evaluate_case(pred: np.ndarray, ref: np.ndarray, spacing) -> dict:
    """Every per-case metric of two (Z, Y, X) label maps (0/1/2) with ``spacing`` (mm)."""
    if pred.shape != ref.shape:
        raise UsageError(f"label maps differ in shape: prediction {pred.shape}, reference {ref.shape}")
    spacing = tuple(float(s) for s in spacing)
    boxes = [b for b in (bounding_box(pred), bounding_box(ref)) if b is not None]  # nonzero = foreground
    if boxes:
        box = tuple(slice(min(b[i].start for b in boxes), max(b[i].stop for b in boxes)) for i in range(pred.ndim))
        p, r = pred[box], ref[box]
    else:
        p = r = np.zeros((0,) * pred.ndim, dtype=np.uint8)
    entry = {name: _structure_entry(p, r, labels, spacing, total=int(pred.size)) for name, labels in STRUCTURES.items()}
    entry["detection"] = detect_lesions(tumour_mask(p), tumour_mask(r)).to_json()
    entry["burden"] = {
        side: (entry["tumour"][f"volume_{side}_ml"] / entry["liver"][f"volume_{side}_ml"] if entry["liver"][f"volume_{side}_ml"] else 0.0)
        for side in ("ref", "pred")
    }
    entry["spacing"] = list(spacing)
    return entry


def _evaluate_pair(pair: CasePair) -> tuple[str, dict]:
    ref, geometry = read_label_map(pair.reference)
    if pair.prediction is None:
        pred = np.zeros_like(ref)
    else:
        pred, _ = read_label_map(pair.prediction)
    entry = evaluate_case(pred, ref, geometry.spacing)
    entry["reference_file"] = str(pair.reference)
    entry["prediction_file"] = None if pair.prediction is None else str(pair.prediction)
    return pair.case, entry


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def summarise(per_case: dict[str, dict]) -> dict:
    """The summary block of evaluation.json from the per-case entries."""
    entries = list(per_case.values())
    summary: dict = {}
    for name in STRUCTURES:
        rows = [e[name] for e in entries]
        total = sum((OverlapCounts(r["tp"], r["fp"], r["fn"], 0) for r in rows), OverlapCounts(0, 0, 0, 0))
        summary[name] = {"dice_per_case": _mean([r["dice"] for r in rows]), "dice_global": dice(total)}
        summary[name].update({m: _mean([r[m] for r in rows]) for m in CASE_METRICS})
    summary["detection"] = detection_summary([e["detection"] for e in entries])
    errors = [e["burden"]["pred"] - e["burden"]["ref"] for e in entries]
    summary["burden"] = {
        "rmse": float(np.sqrt(np.mean(np.square(errors)))) if errors else math.nan,
        "max_error": float(np.max(np.abs(errors))) if errors else math.nan,
    }
    summary["n_cases"] = len(entries)
    return summary


def _jsonable(obj):
    """NaN/inf -> None, numpy scalars -> Python, recursively."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def csv_rows(result: dict) -> list[dict]:
    """One dict per case, keys CSV_COLUMNS, from an evaluation dict."""
    rows = []
    for case, e in result["per_case"].items():
        row = {"case": case}
        for s in STRUCTURES:
            row.update({f"{s}_{m}": e[s][m] for m in CASE_METRICS})
        row.update({col: e["detection"][key] for col, key in DETECTION_COLUMNS.items()})
        row.update({"burden_ref": e["burden"]["ref"], "burden_pred": e["burden"]["pred"]})
        rows.append(row)
    return rows


def write_evaluation(result: dict, output_dir: Path) -> tuple[Path, Path]:
    """Write evaluation.csv and evaluation.json atomically; return their paths."""
    output_dir = Path(output_dir)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in csv_rows(result):
        writer.writerow({k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    csv_path, json_path = output_dir / "evaluation.csv", output_dir / "evaluation.json"
    write_bytes(csv_path, buf.getvalue().encode("utf-8"))
    write_json(json_path, result)
    return csv_path, json_path


def evaluate_folders(reference_dir: str | Path, prediction_dir: str | Path, output_dir: str | Path | None = None,
                     n_jobs: int = 1, progress: bool = True, missing: str = "error",
                     tolerances: Tolerances = Tolerances()) -> dict:
    """Evaluate every reference case; write evaluation.csv/json to ``output_dir`` (if given);
    return the evaluation.json content (NaN as None)."""
    reference_dir, prediction_dir = Path(reference_dir).expanduser(), Path(prediction_dir).expanduser()
    pairs = pair_cases(reference_dir, prediction_dir, missing)
    problems = geometry_problems(pairs, tolerances)
    if problems:
        raise DatasetError(problems)
    log.info("evaluating %d case(s) of %s against %s", len(pairs), prediction_dir, reference_dir)
    per_case = dict(parallel_map(_evaluate_pair, [(p,) for p in pairs], n_jobs=n_jobs, progress=progress, desc="evaluate"))
    result = _jsonable({
        "schema_version": SCHEMA_VERSION,
        "reference": str(reference_dir),
        "prediction": str(prediction_dir),
        "per_case": per_case,
        "summary": summarise(per_case),
    })
    if output_dir is not None:
        csv_path, json_path = write_evaluation(result, Path(output_dir).expanduser())
        log.info("wrote %s and %s", csv_path, json_path)
    return result
