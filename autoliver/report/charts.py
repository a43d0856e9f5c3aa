"""Charts for the HTML report, as PNG bytes: Dice per case, metric distributions per
configuration (or any named source of scores) and training curves of a model folder.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend switch),
like the training curves of ``autoliver.train.progress``, which are reused as they are.
"""

from __future__ import annotations

import io
import logging
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from autoliver.core.layout import FoldPaths, ModelPaths, fold_of
from autoliver.report.overlays import LIVER_RGB, TUMOUR_RGB
from autoliver.train.progress import plot_progress, read_log

log = logging.getLogger(__name__)

STRUCTURES = ("liver", "tumour")
COLOURS = {"liver": tuple(v / 255 for v in LIVER_RGB), "tumour": tuple(v / 255 for v in TUMOUR_RGB)}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_NAMED_CASES = 60  # more cases than this: bars without case names


def _figure(width_in: float, height_in: float, dpi: int = 90):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def dice_bar_chart(per_case: Mapping[str, Mapping[str, float | None]]) -> bytes:
    """Grouped bars: liver and tumour Dice of each case (a missing value leaves a gap)."""
    if not per_case:
        raise ValueError("dice_bar_chart needs at least one case")
    cases = list(per_case)
    n = len(cases)
    fig = _figure(min(16.0, max(5.0, 0.45 * n + 2.0)), 3.6)
    ax = fig.add_subplot()
    width = 0.4
    for k, name in enumerate(STRUCTURES):
        values = [per_case[c].get(name) for c in cases]
        xs = [i + (k - 0.5) * width for i, v in enumerate(values) if v is not None and math.isfinite(v)]
        ys = _finite(values)
        ax.bar(xs, ys, width=width, color=COLOURS[name], label=f"{name} Dice")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("Dice (1 = perfect overlap)")
    ax.set_xlim(-0.6, n - 0.4)
    if n <= MAX_NAMED_CASES:
        ax.set_xticks(range(n))
        ax.set_xticklabels(cases, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center", fontsize=8)
    else:
        ax.set_xlabel(f"{n} cases")
        ax.set_xticks([])
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def box_plots(groups: Mapping[str, Mapping[str, Sequence[float | None]]], metric: str, unit: str = "") -> bytes:
    """One panel per structure, one box per group (configuration, evaluation folder): the
    distribution over cases of ``metric``. ``groups``: group -> structure -> values."""
    if not groups:
        raise ValueError("box_plots needs at least one group")
    names = list(groups)
    fig = _figure(min(14.0, max(6.0, 1.1 * len(names) * 2 + 2.0)), 3.6)
    axes = fig.subplots(1, len(STRUCTURES), squeeze=False)[0]
    for ax, structure in zip(axes, STRUCTURES):
        data = [_finite(groups[g].get(structure, ())) for g in names]
        positions = [i for i, d in enumerate(data) if d]
        if positions:
            parts = ax.boxplot([data[i] for i in positions], positions=positions, widths=0.5, patch_artist=True,
                               medianprops={"color": "black"})
            for patch in parts["boxes"]:
                patch.set_facecolor(COLOURS[structure])
                patch.set_alpha(0.6)
            for i in positions:  # every case as a dot: a box of 3 values hides nothing this way
                ax.plot([i] * len(data[i]), data[i], "o", color="black", markersize=3, alpha=0.6)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20 if len(names) > 2 else 0, fontsize=8)
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_title(structure, fontsize=10)
        ax.set_ylabel(f"{metric} ({unit})" if unit else metric)
        if metric.lower() == "dice":
            ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def training_curves(model_dir: str | Path) -> list[tuple[str, bytes]]:
    """(``<configuration> fold <k>``, PNG) for every trained fold under a model folder
    (``results/<dataset>``): its progress.png, else one drawn from its log.jsonl."""
    root = Path(model_dir)
    out = []
    for fold_dir in ModelPaths(root).fold_dirs():
        fold = FoldPaths(fold_dir)
        title = f"{fold.configuration_dir.name} fold {fold_of(fold_dir.name)}"
        png = fold.progress
        if png.is_file() and png.read_bytes()[:8] == PNG_MAGIC:
            out.append((title, png.read_bytes()))
            continue
        history = read_log(fold.log)
        if not history:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "progress.png"
            plot_progress(target, history)
            out.append((title, target.read_bytes()))
    if not out:
        log.warning("%s: no trained fold with progress.png or log.jsonl found; no training curves", root)
    return out
