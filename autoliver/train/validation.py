"""End-of-fold validation: every validation case predicted whole with the sliding window.

For each case (in the preprocessed grid, at the configuration's full resolution):
``validation/<case>.npz`` holds ``probabilities`` (n_classes, Z, Y, X) float16, compressed,
for later ensembling; ``validation/<case>.json`` its Dice scores; ``metrics.json`` the
per-case and mean Dice of the liver (labels 1 + 2) and the tumour (label 2). Dice follows the
LiTS rule: a case where both prediction and reference are empty scores 1.

Per-case results record the epoch of the weights that made them, so a validation cut short
resumes where it stopped, and a fold trained further is validated again.

A ``3d_lowres`` fold also writes its validation cases' predictions, resampled to the fullres
grid and stored as uint8 label maps (``predicted_next_stage/<case>.b2nd``), the extra input
of ``3d_cascade_fullres``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import blosc2
import numpy as np
import torch

from autoliver.infer.sliding_window import predict_slicewise, sliding_window_predict, softmax_
from autoliver.io.atomic import atomic_path, write_json
from autoliver.preprocess.resample import resample_probabilities
from autoliver.preprocess.storage import CLEVEL, CODEC, DATA_SUFFIX, blosc2_layout, load_case, load_properties
from planning.plans import Configuration

log = logging.getLogger(__name__)

LIVER_LABELS = (1, 2)
TUMOUR_LABELS = (2,)


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (LiTS)."""
    p, r = np.count_nonzero(pred), np.count_nonzero(ref)
    if p + r == 0:
        return 1.0
    return 2.0 * np.count_nonzero(pred & ref) / (p + r)


def case_dice(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Liver (labels 1 + 2) and tumour (label 2) Dice of two label maps."""
    return {
        "liver": dice(np.isin(pred, LIVER_LABELS), np.isin(ref, LIVER_LABELS)),
        "tumour": dice(np.isin(pred, TUMOUR_LABELS), np.isin(ref, TUMOUR_LABELS)),
    }


def one_hot_foreground(seg: np.ndarray, n_classes: int) -> np.ndarray:
    """(Z, Y, X) labels -> (n_classes - 1, Z, Y, X) float32 indicators of labels 1..n_classes-1."""
    return np.stack([(seg == c) for c in range(1, n_classes)]).astype(np.float32)


def load_prev_stage(folder: Path, case_id: str) -> np.ndarray:
    """A previous stage's uint8 label map in this configuration's grid."""
    return blosc2.open(str(Path(folder) / f"{case_id}{DATA_SUFFIX}"), mode="r")[...]


def write_label_map(target: Path, seg: np.ndarray) -> None:
    """Store a uint8 (Z, Y, X) label map as blosc2, in the preprocessed data's layout, atomically."""
    chunks, blocks = blosc2_layout(seg.shape, itemsize=1)
    cparams = blosc2.CParams(codec=CODEC, clevel=CLEVEL, filters=[blosc2.Filter.SHUFFLE], nthreads=1)
    with atomic_path(target, suffix=DATA_SUFFIX) as tmp:
        tmp.unlink()
        blosc2.asarray(np.ascontiguousarray(seg.astype(np.uint8)), urlpath=str(tmp), mode="w", chunks=chunks, blocks=blocks, cparams=cparams)


def make_predictor(model: torch.nn.Module, device: torch.device, autocast_dtype: torch.dtype | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The network as a tile predictor returning logits (B, n_classes, *patch) in float32."""

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(x)
        if isinstance(out, (list, tuple)):
            out = out[0]
        return out.float()

    return predict


def predict_volume(predictor: Callable, data: np.ndarray, config: Configuration, n_classes: int, device: torch.device,
                   step: float = 0.5, prev_seg: np.ndarray | None = None, pad_value: float = 0.0,
                   starts: list[list[int]] | None = None) -> torch.Tensor:
    """Softmax probabilities (n_classes, Z, Y, X) float32 of one preprocessed (Z, Y, X) volume.

    ``prev_seg`` (Z, Y, X) uint8: a previous stage's labels, given as one-hot channels (cascade).
    The only full-size arrays are the float32 image and the logits, turned into probabilities
    in place. ``starts``: tile starts per network axis (the sliding window's default otherwise).
    """
    image = torch.from_numpy(np.asarray(data, dtype=np.float32))[None]
    extra = None if prev_seg is None else torch.from_numpy(one_hot_foreground(prev_seg, n_classes))
    with torch.inference_mode():
        if config.network_dims == 2:
            logits = predict_slicewise(predictor, image, config.patch_size, in_slices=config.in_slices, extra=extra,
                                       step=step, n_classes=n_classes, device=device, pad_value=pad_value, starts=starts)
        else:
            x, pads = image, pad_value
            if extra is not None:  # one-hot channels of the previous stage are padded with 0
                x, pads = torch.cat([image, extra]), [pad_value] + [0.0] * extra.shape[0]
            logits = sliding_window_predict(predictor, x, config.patch_size, step=step, n_classes=n_classes, device=device, pad_value=pads,
                                            starts=starts)
        return softmax_(logits)


def validate_cases(model: torch.nn.Module, config: Configuration, data_folder: Path, case_ids: list[str], out_dir: Path,
                   *, epoch: int, device: torch.device, n_classes: int = 3, step: float = 0.5,
                   autocast_dtype: torch.dtype | None = None, prev_stage_folder: Path | None = None,
                   save_probabilities: bool = True, next_stage: tuple[Path, Path] | None = None,
                   pad_value: float = 0.0) -> dict[str, dict]:
    """Predict ``case_ids``; write each case's npz/json (and next-stage map); return {case: dice}.

    ``next_stage`` = (fullres data folder, output folder) for a 3d_lowres fold.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictor = make_predictor(model, device, autocast_dtype)
    results = {}
    for case_id in case_ids:
        record_path = out_dir / f"{case_id}.json"
        if record_path.is_file():
            record = json.loads(record_path.read_text(encoding="utf-8"))
            if record.get("epoch") == epoch and (next_stage is None or (next_stage[1] / f"{case_id}{DATA_SUFFIX}").is_file()):
                results[case_id] = record["dice"]
                continue
        data, seg, _ = load_case(data_folder, case_id, mmap=False)
        prev = None if prev_stage_folder is None else load_prev_stage(prev_stage_folder, case_id)
        probs = predict_volume(predictor, data, config, n_classes, device, step, prev, pad_value).numpy()
        pred = probs.argmax(0).astype(np.uint8)
        scores = case_dice(pred, seg) if seg is not None else {}
        if save_probabilities:
            with atomic_path(out_dir / f"{case_id}.npz", suffix=".npz") as tmp:
                np.savez_compressed(tmp, probabilities=probs.astype(np.float16))
        if next_stage is not None:
            full_folder, target_folder = next_stage
            full_shape = load_properties(full_folder, case_id)["shape_after_resampling"]
            up = resample_probabilities(probs, full_shape) if tuple(full_shape) != probs.shape[1:] else probs
            write_label_map(target_folder / f"{case_id}{DATA_SUFFIX}", up.argmax(0).astype(np.uint8))
        write_json(record_path, {"case": case_id, "epoch": epoch, "dice": scores, "shape": list(pred.shape)})
        results[case_id] = scores
        log.info("validation %s: liver Dice %.4f, tumour Dice %.4f", case_id, scores.get("liver", float("nan")), scores.get("tumour", float("nan")))
    return results


def summarise(per_case: dict[str, dict], extra: dict | None = None) -> dict:
    """metrics.json content: per-case Dice and the means."""
    names = ("liver", "tumour")
    mean = {n: float(np.mean([d[n] for d in per_case.values()])) if per_case else None for n in names}
    return {"mean": mean, "per_case": {k: per_case[k] for k in sorted(per_case)}, "n_cases": len(per_case),
            "dice_rule": "LiTS: 1 when prediction and reference are both empty", **(extra or {})}
