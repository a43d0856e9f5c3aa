"""The HTML page of ``autoliver compare`` (``results/<dataset>/compare/compare.html``): the table
and charts of ``compare.json``; it reads the measurements, it computes none."""

from __future__ import annotations

from pathlib import Path

from autoliver.core.labels import STRUCTURE_NAMES
from autoliver.io.atomic import write_bytes
from autoliver.report import charts
from autoliver.report.html import environment, fmt

HEADER = ("Configuration", "Network", "Stage", "Cases", "Liver Dice", "Tumour Dice", "Liver IoU", "Tumour IoU", "Liver HD95 (mm)",
          "Tumour HD95 (mm)", "Lesion recall", "Parameters (M)", "GFLOPs / patch", "Training samples/s", "Training (min)",
          "Inference (s/case)", "Peak memory (GiB)")
KEYS = ("configuration", "network", "stage", "cases", "liver_dice", "tumour_dice", "liver_iou", "tumour_iou", "liver_hd95_mm",
        "tumour_hd95_mm", "lesion_recall", "parameters", "gflops_per_patch", "train_samples_per_s", "train_minutes",
        "inference_s_per_case", "peak_memory_gib")


def _cell(key: str, value) -> str:
    if key in ("configuration", "network", "stage", "cases"):
        return str(value)
    if key == "parameters":
        return fmt(None if value is None else value / 1e6, 2)
    return fmt(value, 3 if key.endswith(("dice", "iou", "recall")) else 2)


def render_compare(result: dict) -> str:
    rows = [[_cell(k, r.get(k)) for k in KEYS] for r in result["rows"]]
    means = {r["configuration"]: {s: r.get(f"{s}_dice") for s in STRUCTURE_NAMES} for r in result["rows"]}
    groups = {name: {s: [c[s]["dice"] for c in cases.values()] for s in STRUCTURE_NAMES} for name, cases in result["per_case"].items()}
    figures = [{"title": "Mean Dice per configuration", "png": charts.dice_bar_chart(means)}]
    if any(len(cases) > 1 for cases in result["per_case"].values()):
        figures.append({"title": "Dice per held-out case", "png": charts.box_plots(groups, "dice")})
    context = {"title": f"autoliver compare: {result['dataset']}", "header": HEADER, "rows": rows, "charts": figures,
               "subtitle": f"{len(rows)} configuration(s), {result['budget_minutes']:g} min of training each per fold, folds "
                           f"{', '.join(result['folds'])}"}
    return environment().get_template("compare.html.j2").render(context)


def write_compare_page(result: dict, output: str | Path) -> Path:
    path = Path(output)
    write_bytes(path, render_compare(result).encode("utf-8"))
    return path
