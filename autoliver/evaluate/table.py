"""The evaluation printed as a plain-text table: one row per case, then the summary."""

from __future__ import annotations

import math

COLUMNS = (  # (header, structure or block, key, format)
    ("liver Dice", "liver", "dice", "{:.4f}"),
    ("liver ASSD", "liver", "assd_mm", "{:.2f}"),
    ("liver HD95", "liver", "hd95_mm", "{:.2f}"),
    ("liver RVD", "liver", "rvd", "{:+.3f}"),
    ("tumour Dice", "tumour", "dice", "{:.4f}"),
    ("tumour ASSD", "tumour", "assd_mm", "{:.2f}"),
    ("tumour HD95", "tumour", "hd95_mm", "{:.2f}"),
    ("lesions ref", "detection", "n_ref", "{}"),
    ("lesions pred", "detection", "n_pred", "{}"),
    ("TP>0", "detection", "tp_overlap", "{}"),
    ("TP@.5", "detection", "tp_iou50", "{}"),
    ("burden ref", "burden", "ref", "{:.4f}"),
    ("burden pred", "burden", "pred", "{:.4f}"),
)


def _fmt(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def _grid(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def evaluation_table(result: dict, max_cases: int | None = None) -> str:
    """Per-case rows (the first ``max_cases`` when given), a mean row, then global lines."""
    rows = [["case"] + [c[0] for c in COLUMNS]]
    cases = list(result["per_case"].items())
    shown = cases if max_cases is None else cases[:max_cases]
    for case, e in shown:
        rows.append([case] + [_fmt(e[block][key], fmt) for _, block, key, fmt in COLUMNS])
    s = result["summary"]
    mean_row = ["mean"]
    for _, block, key, fmt in COLUMNS:
        mean_row.append(_fmt(s[block].get(key), fmt) if block in ("liver", "tumour") else "")
    rows.append(mean_row)
    out = [_grid(rows)]
    if len(shown) < len(cases):
        out.append(f"({len(cases) - len(shown)} more case(s) in evaluation.csv)")
    for name in ("liver", "tumour"):
        m = s[name]
        out.append(f"{name}: Dice per case {_fmt(m['dice_per_case'], '{:.4f}')}, global {_fmt(m['dice_global'], '{:.4f}')}, "
                   f"VOE {_fmt(m['voe'], '{:.4f}')}, RVD {_fmt(m['rvd'], '{:+.4f}')}, ASSD {_fmt(m['assd_mm'], '{:.2f}')} mm, "
                   f"MSSD {_fmt(m['mssd_mm'], '{:.2f}')} mm, HD95 {_fmt(m['hd95_mm'], '{:.2f}')} mm, "
                   f"precision {_fmt(m['precision'], '{:.4f}')}, recall {_fmt(m['recall'], '{:.4f}')}")
    d = s["detection"]
    out.append("tumour detection: " + "; ".join(
        f"{label}: precision {_fmt(d[k]['precision'], '{:.3f}')}, recall {_fmt(d[k]['recall'], '{:.3f}')} "
        f"(TP {d[k]['tp']}, FP {d[k]['fp']}, FN {d[k]['fn']})"
        for k, label in (("overlap", "overlap > 0"), ("iou50", "IoU > 0.5"))))
    out.append(f"tumour burden: RMSE {_fmt(s['burden']['rmse'], '{:.4f}')}, max error {_fmt(s['burden']['max_error'], '{:.4f}')} "
               f"({s['n_cases']} case(s))")
    return "\n".join(out)
