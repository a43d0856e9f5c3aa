"""Per-epoch records: log.jsonl (one JSON object per epoch) and the training-curve PNG.

The curve is drawn with matplotlib's object API on an Agg canvas (no pyplot, no global
backend switch) and written atomically, so a viewer never sees half a PNG.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from autoliver.io.atomic import atomic_path, write_bytes

log = logging.getLogger(__name__)


def append_log(path: Path, record: dict) -> None:
    """Append one line to log.jsonl and flush it to disk."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def rewrite_log(path: Path, history: list[dict]) -> None:
    """Replace log.jsonl by ``history`` (on resume: the epochs the checkpoint holds, no more)."""
    write_bytes(path, "".join(json.dumps(r) + "\n" for r in history).encode("utf-8"))


def read_log(path: Path) -> list[dict]:
    """Records of log.jsonl; a truncated last line (a crash mid-write) is skipped."""
    out = []
    if not Path(path).is_file():
        return out
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s: skipping a damaged line", path)
    return out


def plot_progress(path: Path, history: list[dict]) -> None:
    """Training/validation loss, pseudo-Dice per class and learning rate against epoch."""
    if not history:
        return
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(9, 7), dpi=90)
    FigureCanvasAgg(fig)
    ax1, ax3 = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    ax1.plot(epochs, [r["train_loss"] for r in history], color="tab:blue", label="train loss")
    if any(r.get("val_loss") is not None for r in history):
        ax1.plot(epochs, [r.get("val_loss") for r in history], color="tab:red", label="val loss")
    ax1.set_ylabel("loss")
    ax2 = ax1.twinx()
    names = sorted({k for r in history for k in r.get("pseudo_dice", {})})
    for name, colour in zip(names, ("tab:green", "tab:purple", "tab:olive")):
        ax2.plot(epochs, [r.get("pseudo_dice", {}).get(name) for r in history], color=colour, linestyle="--", label=f"pseudo-Dice {name}")
    ax2.plot(epochs, [r.get("pseudo_dice_ema") for r in history], color="black", linestyle=":", label="pseudo-Dice EMA")
    ax2.set_ylabel("pseudo-Dice")
    ax2.set_ylim(0, 1)
    lines = ax1.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax1.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="center right", fontsize=8)
    ax3.plot(epochs, [r["lr"] for r in history], color="tab:orange")
    ax3.set_ylabel("learning rate")
    ax3.set_xlabel("epoch")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
