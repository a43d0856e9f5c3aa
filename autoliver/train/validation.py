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

On a Dask cluster (``--scheduler``) each case is a task of its own
(``validate_case_from_checkpoint``): the worker reads the fold's network from its final
checkpoint on the shared file system, once per worker process, and writes the same files.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import blosc2
import numpy as np
import torch

from autoliver.core import faults
from autoliver.core.artefacts import FoldMetrics
from autoliver.evaluate.overlap import case_dice
from autoliver.infer.predictor import network_from_state
from autoliver.infer.sliding_window import argmax_labels
from autoliver.infer.two_stage import fuse_probabilities, stage_context, stage_min_size, two_stage_predict, window_predictor
from autoliver.infer.volume import make_predictor, predict_volume
from autoliver.io.atomic import atomic_path, write_json
from autoliver.io.checkpoint import load_checkpoint
from autoliver.preprocess.resample import resample_probabilities
from autoliver.preprocess.storage import CLEVEL, CODEC, DATA_SUFFIX, blosc2_layout, load_case, read_case_properties
from planning.plans import Configuration

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class ValidationJob:
    """What end-of-fold validation predicts and where it writes: the configuration and its data
    folder, the output folder, the epoch of the weights (recorded, so a cut-short validation
    resumes), the device and precision, the sliding-window step and padding, a cascade's
    previous-stage folder, a 3d_lowres fold's next-stage target (fullres data folder, output
    folder), and for a two-stage design's tumour stage its liver stage's validation folder."""

    config: Configuration
    data_folder: Path
    out_dir: Path
    epoch: int
    device: torch.device
    n_classes: int = 3
    step: float = 0.5
    autocast_dtype: torch.dtype | None = None
    prev_stage_folder: Path | None = None
    save_probabilities: bool = True
    next_stage: tuple[Path, Path] | None = None
    pad_value: float = 0.0
    liver_validation: Path | None = None


def _case_probabilities(predictor, job: ValidationJob, case_id: str, data: np.ndarray, seg: np.ndarray | None) -> np.ndarray:
    """(n_classes, Z, Y, X) float32 of one case: the network over the whole volume, or for a
    tumour stage the two-stage design (its liver stage's held-out prediction of the same fold
    finds the liver; the ground truth's liver when that prediction is missing, logged)."""
    config = job.config
    if job.liver_validation is None:
        prev = None if job.prev_stage_folder is None else load_prev_stage(job.prev_stage_folder, case_id)
        return predict_volume(predictor, data, config, job.n_classes, job.device, job.step, prev, job.pad_value).numpy()
    liver_npz = Path(job.liver_validation) / f"{case_id}.npz"
    if liver_npz.is_file():
        with np.load(liver_npz) as z:
            liver_probs = torch.from_numpy(z["probabilities"].astype(np.float32))
        if tuple(liver_probs.shape[1:]) != tuple(data.shape):
            liver_probs = torch.from_numpy(resample_probabilities(liver_probs.numpy(), data.shape))
    else:
        log.warning("%s: no liver-stage prediction; the tumour stage of %s is validated inside the true liver (an optimistic score)",
                    liver_npz, case_id)
        liver_probs = torch.from_numpy(np.eye(job.n_classes, dtype=np.float32)[np.asarray(seg, dtype=np.int64)].transpose(3, 0, 1, 2).copy())
    crop_predict = window_predictor(predictor, config, job.n_classes, job.device, job.step, job.pad_value)
    result = two_stage_predict(argmax_labels(liver_probs), data, crop_predict, config.spacing, config.roi_margin_mm,
                               min_size=stage_min_size(config), context=stage_context(config))
    return fuse_probabilities(liver_probs, result).numpy()


def validate_cases(model: torch.nn.Module, job: ValidationJob, case_ids: list[str]) -> dict[str, dict]:
    """Predict ``case_ids``; write each case's npz/json (and next-stage map); return {case: dice}."""
    out_dir = Path(job.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictor = make_predictor(model, job.device, job.autocast_dtype)
    next_stage = job.next_stage
    results = {}
    for case_id in case_ids:
        record_path = out_dir / f"{case_id}.json"
        if record_path.is_file():
            record = json.loads(record_path.read_text(encoding="utf-8"))
            if record.get("epoch") == job.epoch and (next_stage is None or (next_stage[1] / f"{case_id}{DATA_SUFFIX}").is_file()):
                results[case_id] = record["dice"]
                continue
        faults.point("train.validation_case")
        data, seg, _ = load_case(job.data_folder, case_id, mmap=False)
        probs = _case_probabilities(predictor, job, case_id, np.asarray(data), seg)
        pred = probs.argmax(0).astype(np.uint8)
        scores = case_dice(pred, seg) if seg is not None else {}
        if job.save_probabilities:
            with atomic_path(out_dir / f"{case_id}.npz", suffix=".npz") as tmp:
                np.savez_compressed(tmp, probabilities=probs.astype(np.float16))
        if next_stage is not None:
            full_folder, target_folder = next_stage
            full_shape = read_case_properties(full_folder, case_id).shape_after_resampling
            up = resample_probabilities(probs, full_shape) if tuple(full_shape) != probs.shape[1:] else probs
            write_label_map(target_folder / f"{case_id}{DATA_SUFFIX}", up.argmax(0).astype(np.uint8))
        write_json(record_path, {"case": case_id, "epoch": job.epoch, "dice": scores, "shape": list(pred.shape)})
        results[case_id] = scores
        log.info("validation %s: liver Dice %.4f, tumour Dice %.4f", case_id, scores.get("liver", float("nan")), scores.get("tumour", float("nan")))
    return results


_worker_networks: dict[tuple, torch.nn.Module] = {}  # this worker process's network: (path, mtime, size) -> module


def network_from_checkpoint(checkpoint: str | Path, config: Configuration, n_classes: int) -> torch.nn.Module:
    """The fold's network (eval mode, no deep supervision) from ``checkpoint``, kept for the next
    case of this process while the file is unchanged."""
    path = Path(checkpoint)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _worker_networks:
        network, _, _ = network_from_state(load_checkpoint(path), config, path, f"configuration {config.name}", n_classes)
        _worker_networks.clear()
        _worker_networks[key] = network
    return _worker_networks[key]


def validate_case_from_checkpoint(checkpoint: str, job: ValidationJob, case_id: str) -> dict:
    """One validation case as a cluster task: ``validate_cases`` with the network of ``checkpoint``."""
    network = network_from_checkpoint(checkpoint, job.config, job.n_classes).to(job.device)
    return validate_cases(network, job, [case_id])[case_id]


def summarise(per_case: dict[str, dict], extra: dict | None = None) -> dict:
    """metrics.json content: per-case Dice and the means (see :class:`FoldMetrics`)."""
    return FoldMetrics(per_case, extra or {}).to_json()
