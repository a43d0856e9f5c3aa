"""Gather what the HTML report shows: one function per mode, each returning a ``ReportData``
that ``autoliver.report.html`` renders.

- ``build_prediction_report``: a prediction folder (``<case>.nii.gz`` + ``<case>.json`` from
  ``autoliver predict``) with the CT images it came from, optionally reference labels
  (overlays side by side, metrics) or evaluation folders (``autoliver evaluate``), and a model
  folder (training curves, cross-validation scores, what the model was trained on).
- ``build_dataset_report``: a raw dataset's training cases, their reference labels measured
  with the same case report.

Each case is read once (CT, prediction, reference); only the three displayed slices are
rendered. One bad case is listed as failed and the others are still reported.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autoliver import __version__
from autoliver.core.artefacts import FoldMetrics
from autoliver.core.errors import DatasetError, MissingArtefactError, UsageError
from autoliver.core.labels import STRUCTURE_NAMES
from autoliver.core.layout import FoldPaths, ModelPaths, fold_of
from autoliver.core.parallel import parallel_map
from autoliver.evaluate.case_report import case_report
from autoliver.io.dataset import open_dataset
from autoliver.io.images import Geometry, image_suffix, read_image
from autoliver.io.inference_plan import load_inference_plan
from autoliver.io.jsonfile import read_json
from autoliver.report import charts
from autoliver.report.overlays import View, case_views

log = logging.getLogger(__name__)

EVALUATION_JSON = "evaluation.json"


@dataclass(frozen=True)
class Tumour:
    id: int
    volume_ml: float
    diameter_mm: float
    size_category: str


@dataclass(frozen=True)
class CaseSummary:
    """The measurements of one label map (see ``autoliver.evaluate.case_report``)."""

    liver_volume_ml: float
    tumour_volume_ml: float
    tumour_count: int
    tumour_burden: float
    tumours: tuple[Tumour, ...]

    @classmethod
    def from_report(cls, report: Mapping) -> "CaseSummary":
        tumours = tuple(Tumour(int(t["id"]), float(t["volume_ml"]), float(t["largest_diameter_mm"]), str(t["size_category"]))
                        for t in report.get("tumours", []))
        return cls(float(report["liver_volume_ml"]), float(report.get("tumour_volume_ml", sum(t.volume_ml for t in tumours))),
                   int(report.get("tumour_count", len(tumours))), float(report.get("tumour_burden", 0.0)), tumours)


@dataclass(frozen=True)
class CaseEntry:
    case_id: str
    rows: tuple[tuple[str, tuple[View, ...]], ...] = ()  # (row title, axial/coronal/sagittal)
    summary: CaseSummary | None = None  # of the prediction (or, for a dataset, of the label)
    reference: CaseSummary | None = None
    metrics: Mapping[str, Mapping[str, float | None]] | None = None  # structure -> metric -> value
    shape: tuple[int, int, int] | None = None
    spacing: tuple[float, float, float] | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Chart:
    title: str
    caption: str
    png: bytes


@dataclass(frozen=True)
class ReportData:
    title: str
    mode: str  # "prediction" or "dataset"
    sources: tuple[tuple[str, str], ...]  # (what, path)
    cases: tuple[CaseEntry, ...]
    failed: tuple[tuple[str, str], ...] = ()  # (case, message)
    charts: tuple[Chart, ...] = ()
    training: tuple[Chart, ...] = ()
    model_facts: tuple[tuple[str, str], ...] = ()
    summary_metrics: Mapping | None = None  # evaluation.json "summary"
    created: str = field(default_factory=lambda: _dt.datetime.now().isoformat(timespec="seconds"))
    version: str = __version__


def _check_size(max_px: int) -> None:
    if not 16 <= max_px <= 4096:
        raise UsageError(f"image size must be 16..4096 pixels, got {max_px}")


def _images_by_case(folder: str | Path) -> dict[str, Path]:
    """CT images as ``autoliver predict`` finds them (files, ``_0000`` naming, DICOM series)."""
    from autoliver.io.inputs import discover_inputs

    return {c.case_id: c.path for c in discover_inputs(folder)}


def _labels_by_case(folder: str | Path | None) -> dict[str, Path]:
    """Label maps paired by case as ``autoliver evaluate`` pairs them."""
    from autoliver.evaluate.runner import label_files

    return {} if folder is None else label_files(Path(folder))


def _read_label(path: Path, geometry: Geometry, what: str) -> np.ndarray:
    seg, geom = read_image(path)
    if tuple(geom.shape) != tuple(geometry.shape):
        raise UsageError(f"{path}: {what} has shape {geom.shape} but the CT image has {geometry.shape}; "
                         "pair each label map with the image it was made from")
    return seg.astype(np.uint8, copy=False)


def _case_worker(case_id: str, image: Path | None, rows: Sequence[tuple[str, Path]], report_json: Path | None,
                 reference_row: int | None, metrics: Mapping | None, notes: Sequence[str], max_px: int) -> tuple:
    """(``"ok"``, CaseEntry) or (``"failed"``, message); runs in a worker process. Row 0 is the
    label map the case is measured on (the prediction, or a dataset's label)."""
    try:
        if image is None:
            return "failed", f"{case_id}: no CT image found for this case; give the folder the predictions were made from (-i)"
        ct, geometry = read_image(image)
        segs = [_read_label(p, geometry, title.lower()) for title, p in rows]
        views = case_views(ct, geometry, segs, max_px=max_px)
        del ct
        summary = None
        if report_json is not None and report_json.is_file():
            summary = CaseSummary.from_report(read_json(report_json, DatasetError, "delete it or predict the case again"))
        else:
            summary = CaseSummary.from_report(case_report(segs[0], geometry))
        reference = None
        if reference_row is not None:
            reference = CaseSummary.from_report(case_report(segs[reference_row], geometry))
            if metrics is None:
                from autoliver.evaluate import evaluate_case

                metrics = evaluate_case(segs[0], segs[reference_row], geometry.spacing)
        return "ok", CaseEntry(case_id, tuple((t, tuple(v)) for (t, _), v in zip(rows, views)), summary, reference, metrics,
                               tuple(geometry.shape), tuple(geometry.spacing), tuple(notes))
    except Exception as exc:  # noqa: BLE001 - one bad case must not stop the report
        log.debug("report of %s failed", case_id, exc_info=True)
        return "failed", f"{case_id}: {exc}"


def _collect(jobs: list[tuple], n_jobs: int, progress: bool) -> tuple[tuple[CaseEntry, ...], tuple[tuple[str, str], ...]]:
    cases, failed = [], []
    for (status, value), job in zip(parallel_map(_case_worker, jobs, n_jobs=n_jobs, progress=progress, desc="report"), jobs):
        if status == "ok":
            cases.append(value)
        else:
            log.error("%s", value)
            failed.append((job[0], value))
    return tuple(cases), tuple(failed)


def load_evaluation(folder: str | Path) -> dict:
    """``evaluation.json`` of an ``autoliver evaluate`` output folder (or the file itself)."""
    path = Path(folder)
    path = path / EVALUATION_JSON if path.is_dir() else path
    if not path.is_file():
        raise MissingArtefactError(f"{path}: not found; run `autoliver evaluate -r REFERENCES -p PREDICTIONS -o {path.parent}` first")
    data = read_json(path, MissingArtefactError, f"run `autoliver evaluate -r REFERENCES -p PREDICTIONS -o {path.parent}` again")
    if not isinstance(data, dict) or not isinstance(data.get("per_case"), dict):
        raise MissingArtefactError(f"{path}: has no per_case results; run `autoliver evaluate` again to rewrite it")
    return data


def _values(per_case: Mapping[str, Mapping], structure: str, metric: str) -> list[float | None]:
    return [(v.get(structure) or {}).get(metric) for v in per_case.values()]


def _cv_scores(model_dir: Path) -> dict[str, dict[str, list[float]]]:
    """Cross-validation Dice per configuration: fold_*/metrics.json of every configuration."""
    out: dict[str, dict[str, list[float]]] = {}
    for fold_dir in ModelPaths(model_dir).fold_dirs():
        fold = FoldPaths(fold_dir)
        if fold_of(fold_dir.name) == "all" or not fold.metrics.is_file():  # trained on every case: not a held-out score
            continue
        metrics = FoldMetrics.from_json(read_json(fold.metrics, MissingArtefactError), str(fold.metrics))
        scores = out.setdefault(f"CV {fold.configuration_dir.name}", {"liver": [], "tumour": []})
        for structure in STRUCTURE_NAMES:
            scores[structure] += [v[structure] for v in metrics.per_case.values() if v.get(structure) is not None]
    return out


def _model_facts(model_dir: Path, cv: Mapping[str, Mapping[str, list[float]]]) -> tuple[tuple[str, str], ...]:
    facts = [("Model folder", str(model_dir))]
    paths = ModelPaths(model_dir)
    if paths.splits.is_file():
        folds = read_json(paths.splits, MissingArtefactError)
        if isinstance(folds, list) and folds and isinstance(folds[0], Mapping):
            n = len(set(folds[0].get("train", [])) | set(folds[0].get("val", [])))
            facts.append(("Training cases", f"{n} cases"))
    if paths.inference_plan.is_file():
        plan = load_inference_plan(paths.inference_plan)
        facts.append(("Configuration(s) used", " + ".join(plan.configurations)))
        steps = [s.name for s in plan.enabled_steps]
        facts.append(("Post-processing", ", ".join(steps) if steps else "none"))
        ranking = plan.evidence.get("ranking") or []
        if ranking:
            best = ranking[0]
            facts.append(("Cross-validated Dice of the chosen model",
                          f"liver {best.get('liver', float('nan')):.3f}, tumour {best.get('tumour', float('nan')):.3f} "
                          f"(over {plan.evidence.get('n_cases', '?')} cases)"))
    for name, scores in cv.items():
        if scores["liver"]:
            facts.append((f"{name}: mean Dice", f"liver {np.mean(scores['liver']):.3f}, tumour {np.mean(scores['tumour']):.3f} "
                                                f"({len(scores['liver'])} held-out cases)"))
    return tuple(facts)


def _model_section(model_dir: str | Path | None) -> tuple[tuple[Chart, ...], tuple[tuple[str, str], ...], dict]:
    if model_dir is None:
        return (), (), {}
    root = Path(model_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: model folder not found; give results/<dataset> of a trained model (-m)")
    cv = _cv_scores(root)
    curves = tuple(Chart(f"Training curves: {title}", "Loss (solid), pseudo-Dice on validation patches (dashed) and "
                         "learning rate per epoch.", png) for title, png in charts.training_curves(root))
    return curves, _model_facts(root, cv), cv


def _metric_charts(cases: Sequence[CaseEntry], groups: Mapping[str, Mapping[str, Sequence]],
                   distances: Mapping[str, Mapping[str, Sequence]]) -> tuple[Chart, ...]:
    out = []
    per_case = {c.case_id: {s: (c.metrics or {}).get(s, {}).get("dice") for s in ("liver", "tumour")} for c in cases if c.metrics}
    if per_case:
        out.append(Chart("Dice per case", "Overlap of the model's segmentation with the reference, per case: 1 is perfect, "
                         "0 no overlap. A case without tumour in both scores 1 for tumour.", charts.dice_bar_chart(per_case)))
    if groups:
        out.append(Chart("Dice per configuration", "Distribution of the per-case Dice; each dot is one case. \u2018CV\u2019 "
                         "boxes are the model's cross-validation on its training data.", charts.box_plots(groups, "Dice")))
    if any(math.isfinite(v) for g in distances.values() for vals in g.values() for v in vals if v is not None):
        out.append(Chart("Boundary distance per case (HD95)", "95th percentile of the distance between the model's and the "
                         "reference's surfaces, in mm: lower is better.", charts.box_plots(distances, "HD95", "mm")))
    return tuple(out)


def build_prediction_report(predictions: str | Path, images: str | Path, references: str | Path | None = None,
                            evaluations: Sequence[str | Path] = (), model_dir: str | Path | None = None,
                            n_jobs: int = 1, progress: bool = True, max_px: int = 320) -> ReportData:
    """The report of a prediction folder (see the module docstring).

    ``evaluations``: ``autoliver evaluate`` output folders; the first gives the per-case
    metrics, all of them a box each in the per-configuration chart. Without one, each case
    with a reference in ``references`` is scored (``autoliver.evaluate.evaluate_case``) from
    the label maps already read for the overlays.
    """
    _check_size(max_px)
    pred_dir = Path(predictions)
    try:
        preds = _labels_by_case(pred_dir)
    except (ValueError, FileNotFoundError):
        raise MissingArtefactError(f"{pred_dir}: no predictions; run `autoliver predict -i IMAGES -o {pred_dir}` first") from None
    images_by_case = _images_by_case(images)
    refs = _labels_by_case(references)
    evals = [(Path(e).name or str(e), load_evaluation(e)) for e in evaluations]
    per_case_metrics: Mapping[str, Mapping] = evals[0][1]["per_case"] if evals else {}
    summary_metrics = evals[0][1].get("summary") if evals else None
    if references is not None:
        missing = sorted(set(preds) - set(refs))
        if missing:
            log.warning("%d case(s) have no reference label in %s: %s", len(missing), references, ", ".join(missing[:5]))
    jobs = []
    for case_id, pred_path in preds.items():
        rows = [("Model", pred_path)] + ([("Reference", refs[case_id])] if case_id in refs else [])
        notes = ["No reference label for this case."] if references is not None and case_id not in refs else []
        json_path = pred_path.with_name(pred_path.name[: -len(image_suffix(pred_path))] + ".json")
        jobs.append((case_id, images_by_case.get(case_id), rows, json_path if json_path.is_file() else None,
                     1 if case_id in refs else None, per_case_metrics.get(case_id), notes, max_px))
    cases, failed = _collect(jobs, n_jobs, progress)
    training, facts, cv = _model_section(model_dir)
    if not evals and any(c.metrics for c in cases):
        from autoliver.evaluate import summarise

        computed = {c.case_id: c.metrics for c in cases if c.metrics}
        evals = [("this prediction", {"per_case": computed})]
        summary_metrics = summarise(computed)
    groups = {name: {s: _values(e["per_case"], s, "dice") for s in ("liver", "tumour")} for name, e in evals}
    groups.update(cv)
    distances = {name: {s: _values(e["per_case"], s, "hd95_mm") for s in ("liver", "tumour")} for name, e in evals}
    sources = [("Predictions", str(pred_dir)), ("CT images", str(images))]
    sources += [("References", str(references))] if references is not None else []
    sources += [("Evaluation", str(e)) for e in evaluations]
    return ReportData(f"Liver and tumour segmentation report: {pred_dir.name}", "prediction", tuple(sources), cases, failed,
                      _metric_charts(cases, groups, distances), training, facts, summary_metrics)


def build_dataset_report(dataset: str | Path, model_dir: str | Path | None = None, n_jobs: int = 1, progress: bool = True,
                         max_px: int = 320) -> ReportData:
    """The report of a raw dataset's training cases: overlays and measurements of the labels."""
    _check_size(max_px)
    ds = open_dataset(dataset)
    if ds.test:
        log.info("%s: %d test case(s) without labels are not in the report", ds.root, len(ds.test))
    jobs = [(c.case_id, c.images[0] if c.images else None, [("Reference", c.label)], None, None, None, (), max_px) for c in ds.training]
    cases, failed = _collect(jobs, n_jobs, progress)
    training, facts, cv = _model_section(model_dir)
    chart_list = (Chart("Dice per configuration", "Cross-validation Dice of the model's configurations; each dot is one case.",
                        charts.box_plots(cv, "Dice")),) if cv else ()
    return ReportData(f"Dataset report: {ds.name}", "dataset", (("Dataset", str(ds.root)),), cases, failed, chart_list,
                      training, facts)
