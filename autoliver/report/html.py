"""Render a ``ReportData`` as one self-contained HTML page: inline CSS, images as base64 PNG
data URIs, no script, no external URL.

The markup is the Jinja2 template ``templates/report.html.j2``, rendered with autoescaping on
and nothing marked safe, so every value that comes from data (case names, paths, DICOM-derived
text, metric strings) is HTML-escaped in text and attributes alike. This module only turns a
``ReportData`` into plain values (numbers formatted as text) for the template.
"""

from __future__ import annotations

import base64
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import jinja2

from autoliver.evaluate.case_report import LARGE_MM, SMALL_MM
from autoliver.io.atomic import write_bytes
from autoliver.report.build import CaseEntry, CaseSummary, ReportData
from autoliver.report.overlays import LIVER_RGB, TUMOUR_RGB, WINDOW_LEVEL_HU, WINDOW_WIDTH_HU

MAX_TUMOURS_LISTED = 20
METRICS = (  # key in evaluation.json, label, unit
    ("dice", "Dice", ""), ("iou", "IoU (Jaccard)", ""), ("voe", "Volume overlap error", ""),
    ("rvd", "Relative volume difference", ""), ("assd_mm", "Average surface distance", "mm"),
    ("hd95_mm", "95% Hausdorff distance", "mm"), ("mssd_mm", "Maximum surface distance", "mm"),
    ("precision", "Precision", ""), ("recall", "Recall (sensitivity)", ""),
    ("volume_ref_ml", "Volume, reference", "ml"), ("volume_pred_ml", "Volume, model", "ml"),
)

TEMPLATE = "report.html.j2"


@dataclass(frozen=True)
class Link:
    """A table cell that links within the page (the template escapes both parts)."""

    href: str
    text: str


def fmt(value: float | int | None, digits: int = 3, unit: str = "") -> str:
    """A number for a table cell; 'n/a' for a missing or undefined (NaN) value."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    text = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    return f"{text} {unit}" if unit else text


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _rgb(c: tuple[int, int, int]) -> str:
    return "#%02x%02x%02x" % c


@functools.cache
def environment() -> jinja2.Environment:
    """The report's Jinja2 environment: the package's templates, every value autoescaped, an
    undefined name an error."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("autoliver.report", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["data_uri"] = data_uri
    return env


def _largest(summary: CaseSummary | None) -> float | None:
    return max((t.diameter_mm for t in summary.tumours), default=None) if summary else None


def _summary_cells(s: CaseSummary | None) -> list[str]:
    if s is None:
        return ["n/a"] * 5
    return [fmt(s.liver_volume_ml, 1), fmt(s.tumour_count), fmt(s.tumour_volume_ml, 2), fmt(100 * s.tumour_burden, 2),
            fmt(_largest(s), 1)]


def _overview(data: ReportData) -> dict:
    has_metrics = any(c.metrics for c in data.cases)
    has_ref = any(c.reference for c in data.cases)
    header = ["Case", "Liver volume (ml)", "Tumours", "Tumour volume (ml)", "Burden (%)", "Largest tumour (mm)"]
    header += ["Reference: tumours", "Reference: tumour volume (ml)"] if has_ref else []
    header += ["Liver Dice", "Tumour Dice"] if has_metrics else []
    rows = []
    for c in data.cases:
        row = [Link(f"#case-{c.case_id}", c.case_id)] + _summary_cells(c.summary)
        if has_ref:
            row += [fmt(c.reference.tumour_count), fmt(c.reference.tumour_volume_ml, 2)] if c.reference else ["n/a", "n/a"]
        if has_metrics:
            row += [fmt((c.metrics or {}).get(s, {}).get("dice")) for s in ("liver", "tumour")]
        rows.append(row)
    s = data.summary_metrics or {}
    summary = []
    if s:
        items = [("Mean liver Dice", (s.get("liver") or {}).get("dice_per_case")), ("Mean tumour Dice", (s.get("tumour") or {}).get("dice_per_case")),
                 ("Global tumour Dice (all voxels pooled)", (s.get("tumour") or {}).get("dice_global"))]
        det = (s.get("detection") or {}).get("overlap") or {}
        items += [("Tumour detection precision (any overlap)", det.get("precision")), ("Tumour detection recall (any overlap)", det.get("recall"))]
        summary = [[k, fmt(v)] for k, v in items]
    return {"count": len(data.cases), "header": header, "rows": rows, "summary": summary}


def _label_tables(s: CaseSummary, title: str) -> dict:
    """Measures and tumour list of one label map."""
    measures = [["Liver volume (incl. tumours)", fmt(s.liver_volume_ml, 1, "ml")],
                ["Number of tumours (separate 3D pieces, touching corners count as one)", fmt(s.tumour_count)],
                ["Total tumour volume", fmt(s.tumour_volume_ml, 2, "ml")], ["Tumour burden", fmt(100 * s.tumour_burden, 2, "%")]]
    tumours = [[fmt(t.id), fmt(t.volume_ml, 2), fmt(t.diameter_mm, 1), t.size_category] for t in s.tumours[:MAX_TUMOURS_LISTED]]
    return {"title": title, "measures": measures, "tumours": tumours, "more": len(s.tumours) - MAX_TUMOURS_LISTED}


def _metric_rows(metrics: Mapping[str, Mapping[str, float | None]]) -> list[list[str]]:
    rows = []
    for key, label, unit in METRICS:
        if all(key not in (metrics.get(s) or {}) for s in ("liver", "tumour")):
            continue
        values = [(metrics.get(s) or {}).get(key) for s in ("liver", "tumour")]
        rows.append([f"{label} ({unit})" if unit else label] + [fmt(v, 2 if unit else 3) for v in values])
    det = metrics.get("detection") or {}
    if det:
        rows.append(["Lesions found / in reference (LiTS detection rule: face-connected, close pieces joined)", "",
                     fmt(det.get("n_pred")) + " / " + fmt(det.get("n_ref"))])
    return rows


def _case(c: CaseEntry) -> dict:
    has_size = bool(c.shape and c.spacing)
    label = "Measured on the model's segmentation" if c.rows and c.rows[0][0] == "Model" else "Measured on the label"
    return {
        "id": c.case_id,
        "size": " x ".join(str(v) for v in reversed(c.shape)) if has_size else "",
        "mm": " x ".join(f"{v:.3g}" for v in reversed(c.spacing)) if has_size else "",
        "notes": list(c.notes),
        "rows": [(title, list(views)) for title, views in c.rows],
        "summary": _label_tables(c.summary, label) if c.summary else None,
        "reference": _label_tables(c.reference, "Reference") if c.reference else None,
        "metrics": _metric_rows(c.metrics) if c.metrics else None,
    }


def context(data: ReportData) -> dict:
    """Everything the template shows, as plain values (no markup)."""
    return {
        "title": data.title, "created": data.created, "version": data.version, "mode": data.mode,
        "sources": [[k, v] for k, v in data.sources],
        "model_facts": [[k, v] for k, v in data.model_facts],
        "trained": dict(data.model_facts).get("Training cases"),
        "liver_rgb": _rgb(LIVER_RGB), "tumour_rgb": _rgb(TUMOUR_RGB),
        "window_width": f"{WINDOW_WIDTH_HU:g}", "window_level": f"{WINDOW_LEVEL_HU:g}",
        "small_mm": f"{SMALL_MM:g}", "large_mm": f"{LARGE_MM:g}",
        "overview": _overview(data),
        "failed": [message for _, message in data.failed],
        "charts": list(data.charts), "training": list(data.training),
        "cases": [_case(c) for c in data.cases],
    }


def render_html(data: ReportData) -> str:
    return environment().get_template(TEMPLATE).render(context(data))


def write_report(data: ReportData, output: str | Path) -> Path:
    """Write the page atomically; returns its path."""
    path = Path(output)
    write_bytes(path, render_html(data).encode("utf-8"))
    return path
