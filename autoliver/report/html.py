"""Render a ``ReportData`` as one self-contained HTML page: inline CSS, images as base64 PNG
data URIs, no script, no external URL. Every string that comes from data (case names, paths,
metric values) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from autoliver.evaluate.case_report import LARGE_MM, SMALL_MM
from autoliver.io.atomic import write_bytes
from autoliver.report.build import CaseEntry, CaseSummary, Chart, ReportData
from autoliver.report.overlays import LIVER_RGB, TUMOUR_RGB, WINDOW_LEVEL_HU, WINDOW_WIDTH_HU, View

MAX_TUMOURS_LISTED = 20
METRICS = (  # key in evaluation.json, label, unit
    ("dice", "Dice", ""), ("iou", "IoU (Jaccard)", ""), ("voe", "Volume overlap error", ""),
    ("rvd", "Relative volume difference", ""), ("assd_mm", "Average surface distance", "mm"),
    ("hd95_mm", "95% Hausdorff distance", "mm"), ("mssd_mm", "Maximum surface distance", "mm"),
    ("precision", "Precision", ""), ("recall", "Recall (sensitivity)", ""),
    ("volume_ref_ml", "Volume, reference", "ml"), ("volume_pred_ml", "Volume, model", "ml"),
)

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;margin:0 auto;max-width:1200px;padding:1em 1.5em;color:#1a1a1a;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.6em}h3{margin:.8em 0 .3em}
table{border-collapse:collapse;margin:.4em 0 1em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f3f3}
.box{border:1px solid #ccc;border-radius:6px;padding:.6em 1em;margin:1em 0;background:#fafafa}
.limits{border-color:#d55e00;background:#fff6ef}
.swatch{display:inline-block;width:1.1em;height:1.1em;vertical-align:middle;border:2px solid;margin-right:.3em}
.views{display:flex;flex-wrap:wrap;gap:.6em;align-items:flex-start}
figure{margin:0;background:#000;color:#eee;padding:4px;border-radius:4px}figure img{display:block;max-width:100%;height:auto}
figcaption{font-size:.8em;padding:.2em}.chart img{max-width:100%;height:auto;border:1px solid #ddd}
.tables{display:flex;flex-wrap:wrap;gap:0 2em;align-items:flex-start}.case{page-break-inside:avoid}.note{color:#8a4b00}.muted{color:#666;font-size:.9em}
"""


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: float | int | None, digits: int = 3, unit: str = "") -> str:
    """A number for a table cell; 'n/a' for a missing or undefined (NaN) value."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    text = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    return f"{text} {unit}" if unit else text


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img(png: bytes, alt: str, width: int | None = None, height: int | None = None) -> str:
    size = f' width="{int(width)}" height="{int(height)}"' if width and height else ""
    return f'<img src="{data_uri(png)}" alt="{esc(alt)}"{size}>'


def table(header: Sequence[str], rows: Iterable[Sequence[str]], numeric_from: int = 1) -> str:
    """A table; cells are already-escaped HTML; columns from ``numeric_from`` are right-aligned."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i >= numeric_from else f"<td>{c}</td>" for i, c in enumerate(r)) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _rgb(c: tuple[int, int, int]) -> str:
    return "#%02x%02x%02x" % c


def legend(data: ReportData) -> str:
    liver, tumour = _rgb(LIVER_RGB), _rgb(TUMOUR_RGB)
    swatch = '<span class="swatch" style="background:{0}59;border-color:{0}"></span>'
    rows_text = ("<li><b>Model</b> row: the automatic segmentation. <b>Reference</b> row (when given): the reference "
                 "segmentation of the same slices, usually drawn by an expert.</li>") if data.mode == "prediction" else \
        "<li>The coloured areas are the dataset's reference labels.</li>"
    return f"""<div class="box"><h3>How to read this report</h3><ul>
<li>{swatch.format(liver)}<b>Liver</b> &nbsp; {swatch.format(tumour)}<b>Tumour</b> (lesion inside the liver); the outline marks the edge.</li>
{rows_text}
<li>CT shown in an abdominal window (width {WINDOW_WIDTH_HU:g} HU, level {WINDOW_LEVEL_HU:g} HU). Axial images are seen from the
feet (patient's right on the left of the image), coronal from the front, sagittal from the patient's left; the slices shown
are those with the most tumour (or, without tumour, the most liver). Pixels are square in millimetres.</li>
<li><b>Liver volume</b> includes the tumours. <b>Tumour burden</b> = total tumour volume / liver volume. A <b>tumour</b> is one
connected lesion; its <b>diameter</b> is its largest extent in 3D, in mm (small &lt; {SMALL_MM:g} mm, medium
{SMALL_MM:g}&ndash;{LARGE_MM:g} mm, large &gt; {LARGE_MM:g} mm).</li>
<li><b>Dice</b> measures overlap with the reference: 1 = identical, 0 = no overlap; above about 0.95 for the liver and 0.7
for tumours is typical of good automatic methods. When neither the model nor the reference finds a tumour, tumour Dice is 1.
<b>95% Hausdorff distance</b> (mm): nearly the largest gap between the two outlines; lower is better.</li>
</ul></div>"""


def limits(data: ReportData) -> str:
    trained = dict(data.model_facts).get("Training cases")
    model_line = (f"<li>The model was trained on {esc(trained)}. Scans unlike its training scans (other scanners or contrast "
                  "phases, children, operated livers, metal) may be segmented worse.</li>") if trained else \
        ("<li>The model's training data are not described here (no model folder given); scans unlike them may be segmented "
         "worse.</li>") if data.mode == "prediction" else ""
    return f"""<div class="box limits"><h3>Limits</h3><ul>
<li>The segmentations are made by software. They are not a diagnosis and must be checked by a radiologist before any
clinical use.</li>{model_line}
<li>Small tumours (under {SMALL_MM:g} mm) are the most often missed or only partly outlined; counts and volumes of small
lesions are the least reliable. Volumes are counted in the scan's own voxels, so thick slices make them coarser.</li>
<li>Three slices per case are shown: look at the full scan for everything else.</li></ul></div>"""


def _largest(summary: CaseSummary | None) -> float | None:
    return max((t.diameter_mm for t in summary.tumours), default=None) if summary else None


def _summary_cells(s: CaseSummary | None) -> list[str]:
    if s is None:
        return ["n/a"] * 5
    return [fmt(s.liver_volume_ml, 1), fmt(s.tumour_count), fmt(s.tumour_volume_ml, 2), fmt(100 * s.tumour_burden, 2),
            fmt(_largest(s), 1)]


def overview(data: ReportData) -> str:
    has_metrics = any(c.metrics for c in data.cases)
    has_ref = any(c.reference for c in data.cases)
    header = ["Case", "Liver volume (ml)", "Tumours", "Tumour volume (ml)", "Burden (%)", "Largest tumour (mm)"]
    header += ["Reference: tumours", "Reference: tumour volume (ml)"] if has_ref else []
    header += ["Liver Dice", "Tumour Dice"] if has_metrics else []
    rows = []
    for c in data.cases:
        row = [f'<a href="#case-{esc(c.case_id)}">{esc(c.case_id)}</a>'] + _summary_cells(c.summary)
        if has_ref:
            row += [fmt(c.reference.tumour_count), fmt(c.reference.tumour_volume_ml, 2)] if c.reference else ["n/a", "n/a"]
        if has_metrics:
            row += [fmt((c.metrics or {}).get(s, {}).get("dice")) for s in ("liver", "tumour")]
        rows.append(row)
    out = f"<h2>All cases ({len(data.cases)})</h2>" + table(header, rows)
    s = data.summary_metrics or {}
    if s:
        items = [("Mean liver Dice", (s.get("liver") or {}).get("dice_per_case")), ("Mean tumour Dice", (s.get("tumour") or {}).get("dice_per_case")),
                 ("Global tumour Dice (all voxels pooled)", (s.get("tumour") or {}).get("dice_global"))]
        det = (s.get("detection") or {}).get("overlap") or {}
        items += [("Tumour detection precision (any overlap)", det.get("precision")), ("Tumour detection recall (any overlap)", det.get("recall"))]
        out += "<h3>Summary over cases</h3>" + table(["Measure", "Value"], [[esc(k), fmt(v)] for k, v in items])
    return out


def _views(rows: Sequence[tuple[str, Sequence[View]]], case_id: str) -> str:
    out = []
    for title, views in rows:
        figs = "".join(f"<figure>{img(v.png, f'{case_id}: {title}, {v.name} slice {v.index + 1} of {v.count}', v.width, v.height)}"
                       f"<figcaption>{esc(v.name.capitalize())}, slice {v.index + 1} of {v.count}</figcaption></figure>" for v in views)
        out.append(f"<h3>{esc(title)}</h3><div class=\"views\">{figs}</div>")
    return "".join(out)


def _tumour_table(s: CaseSummary) -> str:
    if not s.tumours:
        return "<p>No tumour found.</p>"
    rows = [[fmt(t.id), fmt(t.volume_ml, 2), fmt(t.diameter_mm, 1), esc(t.size_category)] for t in s.tumours[:MAX_TUMOURS_LISTED]]
    more = len(s.tumours) - MAX_TUMOURS_LISTED
    tail = f'<p class="muted">and {more} smaller tumour(s) not listed.</p>' if more > 0 else ""
    return table(["Tumour", "Volume (ml)", "Largest diameter (mm)", "Size"], rows, numeric_from=0) + tail


def _metric_table(metrics: Mapping[str, Mapping[str, float | None]]) -> str:
    rows = []
    for key, label, unit in METRICS:
        values = [(metrics.get(s) or {}).get(key) for s in ("liver", "tumour")]
        if all(key not in (metrics.get(s) or {}) for s in ("liver", "tumour")):
            continue
        rows.append([esc(f"{label} ({unit})" if unit else label)] + [fmt(v, 2 if unit else 3) for v in values])
    det = metrics.get("detection") or {}
    if det:
        rows.append([esc("Lesions found / in reference (LiTS detection rule: face-connected, close pieces joined)"), "", fmt(det.get("n_pred")) + " / " + fmt(det.get("n_ref"))])
    return table(["Metric", "Liver", "Tumour"], rows) + '<p class="muted">n/a: undefined (one of the two is empty).</p>'


def _measures(s: CaseSummary) -> str:
    return table(["Measure", "Value"], [
        ["Liver volume (incl. tumours)", fmt(s.liver_volume_ml, 1, "ml")], ["Number of tumours (separate 3D pieces, touching corners count as one)", fmt(s.tumour_count)],
        ["Total tumour volume", fmt(s.tumour_volume_ml, 2, "ml")], ["Tumour burden", fmt(100 * s.tumour_burden, 2, "%")]])


def case_section(c: CaseEntry) -> str:
    out = [f'<section class="case" id="case-{esc(c.case_id)}"><h2>{esc(c.case_id)}</h2>']
    if c.shape and c.spacing:
        out.append(f'<p class="muted">{esc(" x ".join(str(v) for v in reversed(c.shape)))} voxels, '
                   f'{esc(" x ".join(f"{v:.3g}" for v in reversed(c.spacing)))} mm (x, y, z)</p>')
    out += [f'<p class="note">{esc(n)}</p>' for n in c.notes]
    out.append(_views(c.rows, c.case_id))
    out.append('<div class="tables">')
    if c.summary:
        label = "Measured on the model's segmentation" if c.rows and c.rows[0][0] == "Model" else "Measured on the label"
        out.append(f"<div><h3>{esc(label)}</h3>{_measures(c.summary)}{_tumour_table(c.summary)}</div>")
    if c.reference:
        out.append(f"<div><h3>Reference</h3>{_measures(c.reference)}{_tumour_table(c.reference)}</div>")
    if c.metrics:
        out.append(f"<div><h3>Agreement with the reference</h3>{_metric_table(c.metrics)}</div>")
    out.append("</div></section>")
    return "".join(out)


def _chart(ch: Chart) -> str:
    return f'<div class="chart"><h3>{esc(ch.title)}</h3><p class="muted">{esc(ch.caption)}</p>{img(ch.png, ch.title)}</div>'


def render_html(data: ReportData) -> str:
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
             f"<title>{esc(data.title)}</title><style>{STYLE}</style></head><body>",
             f"<h1>{esc(data.title)}</h1><p class=\"muted\">Made {esc(data.created)} by autoliver {esc(data.version)}</p>",
             table(["Input", "Location"], [[esc(k), esc(v)] for k, v in data.sources], numeric_from=2),
             legend(data), limits(data)]
    if data.model_facts:
        parts.append("<h2>Model</h2>" + table(["", ""], [[esc(k), esc(v)] for k, v in data.model_facts], numeric_from=2))
    parts.append(overview(data))
    if data.failed:
        parts.append("<h2>Cases that could not be shown</h2><ul>" + "".join(f"<li>{esc(m)}</li>" for _, m in data.failed) + "</ul>")
    if data.charts:
        parts.append("<h2>Charts</h2>" + "".join(_chart(ch) for ch in data.charts))
    parts += [case_section(c) for c in data.cases]
    if data.training:
        parts.append("<h2>Training</h2>" + "".join(f"<details><summary>{esc(ch.title)}</summary>{_chart(ch)}</details>" for ch in data.training))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(data: ReportData, output: str | Path) -> Path:
    """Write the page atomically; returns its path."""
    path = Path(output)
    write_bytes(path, render_html(data).encode("utf-8"))
    return path
