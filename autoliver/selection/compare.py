"""``autoliver compare``: configurations side by side on the same folds at the same training budget.

For each configuration and fold: training (skipped when the fold is finished, continued when
it was interrupted), each run in a fresh child process so that its peak memory is its own;
then the held-out cases' validation predictions (written by the fold's end-of-training
validation, in the configuration's own preprocessed grid) are scored against the reference
labels of that grid with the evaluation metrics (liver and tumour Dice, IoU, HD95, lesion
recall). Per configuration: parameters, FLOPs of one forward pass over one patch, training
samples per second, inference seconds per case and the training's peak memory.

Results go to ``results/<dataset>/compare/``: ``compare.json`` (everything, per case too),
``compare.csv`` (one row per configuration); the report layer turns them into HTML.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autoliver.core.errors import MissingArtefactError, PlanError
from autoliver.core.labels import N_CLASSES
from autoliver.core.layout import DatasetPaths, fold_name
from autoliver.evaluate.runner import evaluate_case
from autoliver.io.atomic import write_bytes, write_json
from autoliver.io.checkpoint import load_checkpoint
from autoliver.io.jsonfile import read_json
from autoliver.io.plans_file import load_plans
from autoliver.preprocess.storage import load_case, read_case_properties
from autoliver.train.options import TrainOptions
from autoliver.train.setup import train_fold
from planning.plans import Configuration

log = logging.getLogger(__name__)

COLUMNS = ("configuration", "network", "stage", "folds", "cases", "liver_dice", "tumour_dice", "liver_iou", "tumour_iou",
           "liver_hd95_mm", "tumour_hd95_mm", "lesion_recall", "parameters", "gflops_per_patch", "train_samples_per_s",
           "train_minutes", "inference_s_per_case", "peak_memory_gib")


@dataclass(frozen=True)
class CompareOptions:
    budget_minutes: float
    folds: tuple[int | str, ...] = (0,)
    device: str = "auto"
    seed: int = 0
    n_workers: int = 0  # data-loading workers per training
    isolate: bool = True  # train each fold in a fresh child process (its own peak memory)
    progress: bool = True
    train_overrides: dict = field(default_factory=dict)  # extra TrainOptions fields (e.g. val_iters)


def _peak_rss_gib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 2**30
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def _train_child(paths: DatasetPaths, configuration: str, fold: int | str, options: TrainOptions) -> float | None:
    """Runs in a fresh process: train, return this process's peak memory (GiB)."""
    train_fold(paths, configuration, fold, options)
    return _peak_rss_gib()


def train_all(paths: DatasetPaths, configurations: Sequence[str], options: CompareOptions,
              train: Callable[..., float | None] = _train_child) -> dict[str, dict[str, float | None]]:
    """Train every configuration's folds for the same budget; {configuration: {fold: peak GiB}}.
    A finished fold is skipped (its earlier peak is kept in ``compare/peaks.json``)."""
    peaks_path = paths.model.root / "compare" / "peaks.json"
    peaks = read_json(peaks_path) if peaks_path.is_file() else {}
    for config in configurations:
        for fold in options.folds:
            fp = paths.model.fold(config, fold)
            if fp.final.is_file():
                log.info("%s %s: already trained, skipped", config, fold_name(fold))
                continue
            train_options = TrainOptions(budget_minutes=options.budget_minutes, device=options.device, seed=options.seed,
                                         n_workers=options.n_workers, resume=fp.latest.is_file(), progress=options.progress,
                                         **options.train_overrides)
            if options.isolate:
                with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
                    peak = pool.submit(train, paths, config, fold, train_options).result()
            else:
                peak = train(paths, config, fold, train_options)
            peaks.setdefault(config, {})[str(fold)] = peak
            write_json(peaks_path, peaks)
    return peaks


def network_cost(config: Configuration, arch: str, n_classes: int = N_CLASSES) -> tuple[int, float]:
    """(parameters, GFLOPs of one forward pass over one patch, batch 1) of ``config``'s network."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from autoliver.nets import build_network, net_spec

    spec = net_spec(config, n_classes, deep_supervision=False)
    model = build_network(arch, spec).eval()
    params = sum(p.numel() for p in model.parameters())
    x = torch.zeros((1, spec.in_channels, *config.patch_size))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(params), counter.get_total_flops() / 1e9


def _fold_training(fold_dir_final: Path) -> dict:
    state = load_checkpoint(fold_dir_final, map_location="cpu")
    history = state.get("history") or []
    config = state.get("configuration") or {}
    batch = int(config.get("batch_size", 1))
    # samples/s over the training iterations themselves (the log's per-epoch samples and train_s);
    # the fold's whole time (setup, validation batches, checkpoints, final validation) is train_seconds
    samples = sum(float(r.get("samples", int(r.get("iters", state.get("iters_per_epoch") or 0)) * batch)) for r in history)
    seconds = sum(float(r.get("train_s", r.get("epoch_s", 0.0))) for r in history)
    total = float(state.get("train_seconds") or seconds)
    return {"samples": samples, "seconds": seconds, "total_seconds": total, "arch": (state.get("network") or {}).get("arch", "unet")}


def score_fold(paths: DatasetPaths, config: Configuration, fold: int | str, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Per held-out case metrics of one trained fold (its validation predictions vs the references)."""
    fp = paths.model.fold(config.name, fold)
    if not fp.final.is_file():
        raise MissingArtefactError(f"{fp.final}: not found; run `autoliver train -d {paths.name} {config.name} {fold}`")
    data_folder = paths.data(config.data_identifier)
    cases = {}
    for npz in sorted(fp.validation.glob("*.npz")):
        case = npz.stem
        _, ref, _ = load_case(data_folder, case, mmap=False)
        with np.load(npz) as z:
            pred = z["probabilities"].argmax(0).astype(np.uint8)
        if ref is None or pred.shape != ref.shape:
            raise PlanError(f"{npz}: prediction {pred.shape} does not match the reference of {data_folder} ({None if ref is None else ref.shape})")
        cases[case] = evaluate_case(pred, np.asarray(ref, dtype=np.uint8), read_case_properties(data_folder, case).spacing)
    if not cases:
        raise MissingArtefactError(f"{fp.validation}: no held-out predictions; the fold's final validation did not run")
    return cases


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def summarise_configuration(config: Configuration, per_case: dict[str, dict], training: list[dict], peaks: list[float | None],
                            params: int, gflops: float, inference_s: float | None, n_folds: int) -> dict:
    tp = sum(c["detection"]["tp_overlap"] for c in per_case.values())
    fn = sum(c["detection"]["fn_overlap"] for c in per_case.values())
    samples, seconds = sum(t["samples"] for t in training), sum(t["seconds"] for t in training)
    row = {
        "configuration": config.name, "network": training[0]["arch"] if training else config.network, "stage": config.stage,
        "folds": n_folds, "cases": len(per_case),
        "lesion_recall": tp / (tp + fn) if tp + fn else None, "parameters": params, "gflops_per_patch": round(gflops, 3),
        "train_samples_per_s": samples / seconds if seconds else None, "train_minutes": sum(t["total_seconds"] for t in training) / 60,
        "inference_s_per_case": inference_s, "peak_memory_gib": max((p for p in peaks if p is not None), default=None),
    }
    for s in ("liver", "tumour"):
        row[f"{s}_dice"] = _mean([c[s]["dice"] for c in per_case.values()])
        row[f"{s}_iou"] = _mean([c[s]["iou"] for c in per_case.values()])
        row[f"{s}_hd95_mm"] = _mean([c[s]["hd95_mm"] for c in per_case.values()])
    return row


def inference_seconds(paths: DatasetPaths, config: Configuration, fold: int | str, case: str,
                      clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds to predict one held-out case whole (sliding window, no TTA) with the fold's network."""
    from autoliver.infer.predictor import load_model, predict_preprocessed

    model = load_model(paths.model.root, config.name, [fold], device="cpu")
    data, _, _ = load_case(paths.data(config.data_identifier), case, mmap=False)
    t0 = clock()
    predict_preprocessed(model, np.asarray(data), tta=False)
    return clock() - t0


def compare_configurations(paths: DatasetPaths, configurations: Sequence[str], options: CompareOptions,
                           train: Callable[..., float | None] = _train_child, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Train, score and measure ``configurations``; write compare.json/.csv; return the result."""
    plans = load_plans(paths)
    missing = [c for c in configurations if c not in plans.configurations]
    if missing:
        raise PlanError(f"configuration(s) {', '.join(missing)} not in {paths.plans}; add them with `autoliver add_configuration "
                        f"{paths.name} --recipe NAME` (see `autoliver recipes`)")
    peaks = train_all(paths, configurations, options, train)
    rows, per_case = [], {}
    for name in configurations:
        config = plans.configurations[name]
        cases: dict[str, dict] = {}
        for fold in options.folds:
            cases.update(score_fold(paths, config, fold))
        training = [_fold_training(paths.model.fold(name, f).final) for f in options.folds]
        params, gflops = network_cost(config, training[0]["arch"])
        first = sorted(cases)[0]
        holding = next(f for f in options.folds if paths.model.fold(name, f).validation_case(first, ".npz").is_file())
        seconds = None if config.previous_stage else inference_seconds(paths, config, holding, first, clock)
        rows.append(summarise_configuration(config, cases, training, list((peaks.get(name) or {}).values()), params, gflops, seconds,
                                            len(options.folds)))
        per_case[name] = cases
    result = {"dataset": paths.name, "budget_minutes": options.budget_minutes, "folds": [str(f) for f in options.folds],
              "columns": list(COLUMNS), "rows": rows, "per_case": per_case}
    out = paths.model.root / "compare"
    write_json(out / "compare.json", result)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    write_bytes(out / "compare.csv", buf.getvalue().encode("utf-8"))
    log.info("wrote %s and %s", out / "compare.json", out / "compare.csv")
    return result


def table(result: dict) -> str:
    """The comparison as a Markdown table."""
    shown = ("configuration", "liver_dice", "tumour_dice", "liver_iou", "liver_hd95_mm", "lesion_recall", "parameters", "gflops_per_patch",
             "train_samples_per_s", "train_minutes", "inference_s_per_case", "peak_memory_gib")

    def fmt(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in shown) + " |" for r in result["rows"]]
    return "\n".join(lines)
