"""The model card a model package carries (``manifest.json`` -> ``model_card``).

Pure functions over the artefacts a model folder already holds: the dataset's dataset.json
(name, modality, labels, number of training cases), its fingerprint (spacing summary), every
packaged fold's ``metrics.json`` (:class:`autoliver.core.artefacts.FoldMetrics`: the
cross-validation Dice on the fold's held-out cases) and the inference plan (what prediction
runs by default). Nothing is measured here; a value that is not in the artefacts is absent.
"""

from __future__ import annotations

from collections.abc import Mapping

from autoliver.core.artefacts import FoldMetrics, InferencePlan
from autoliver.core.labels import STRUCTURE_NAMES

INTENDED_USE = (
    "Research use only. This model is not a medical device: it has not been cleared or approved for clinical use, and its "
    "output must not be used to diagnose, treat or make any decision about a patient. It segments the liver (label 1) and "
    "liver tumours (label 2) in abdominal CT of the kind described under training_data; its cross-validation figures measure "
    "it on held-out cases of that same dataset, not on scans from other scanners, sites, protocols or populations, where it "
    "may fail without warning. Every output needs review by a qualified reader."
)


def _spacing_summary(fingerprint: Mapping | None) -> dict | None:
    spacing = (fingerprint or {}).get("spacing")
    if not isinstance(spacing, Mapping) or "median" not in spacing:
        return None
    pct = spacing.get("percentiles") or {}
    out = {"axes": "z, y, x (mm)", "median": spacing["median"]}
    for p in ("5", "95"):
        if p in pct:
            out[f"p{p}"] = pct[p]
    return out


def training_data(dataset_name: str, dataset_json: Mapping | None, fingerprint: Mapping | None, plans_labels: Mapping) -> dict:
    """What the model was trained on: dataset name, cases, modality, labels, spacing summary."""
    dj, fp = dataset_json or {}, fingerprint or {}
    n_cases = fp.get("n_cases", dj.get("numTraining"))
    out = {
        "dataset": dataset_name,
        "description": dj.get("description") or dj.get("name"),
        "n_training_cases": int(n_cases) if isinstance(n_cases, (int, float)) else None,
        "modality": dict(dj.get("channel_names") or dj.get("modality") or fp.get("channel_names") or {}),
        "labels": dict(dj.get("labels") or fp.get("labels") or plans_labels),
        "spacing_mm": _spacing_summary(fp),
        "licence": dj.get("licence") or dj.get("license"),
        "reference": dj.get("reference"),
    }
    return {k: v for k, v in out.items() if v is not None}


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def cross_validation(metrics: Mapping[str, Mapping[str, FoldMetrics | None]]) -> dict:
    """configuration -> {folds: {fold: {n_cases, mean_dice}}, mean_dice over the folds with
    metrics}; a fold without metrics.json is listed with ``mean_dice`` None."""
    out = {}
    for configuration, folds in metrics.items():
        per_fold = {}
        for fold, m in folds.items():
            per_fold[fold] = ({"n_cases": None, "mean_dice": None} if m is None
                              else {"n_cases": len(m.per_case), "mean_dice": m.mean, "dice_rule": m.dice_rule})
        means = {n: _mean([f["mean_dice"][n] for f in per_fold.values() if f["mean_dice"] is not None]) for n in STRUCTURE_NAMES}
        out[configuration] = {"folds": per_fold, "mean_dice": means,
                              "note": "mean over the folds of each fold's mean Dice on its held-out cases (liver = labels 1 + 2, tumour = label 2)"}
    return out


def selected(plan: InferencePlan | None) -> dict | None:
    """What ``predict`` runs by default with this package (from its inference plan)."""
    if plan is None:
        return None
    return {"configurations": list(plan.configurations), "folds": {k: list(v) for k, v in plan.folds.items()},
            "postprocessing": [s.name for s in plan.enabled_steps], "evidence": dict(plan.evidence)}


def model_card(dataset_name: str, dataset_json: Mapping | None, fingerprint: Mapping | None, plans_labels: Mapping,
               metrics: Mapping[str, Mapping[str, FoldMetrics | None]], plan: InferencePlan | None, intended_use: str = INTENDED_USE) -> dict:
    card = {
        "intended_use": intended_use,
        "training_data": training_data(dataset_name, dataset_json, fingerprint, plans_labels),
        "cross_validation": cross_validation(metrics),
    }
    default = selected(plan)
    if default is not None:
        card["default_prediction"] = default
    return card
