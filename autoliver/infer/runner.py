"""Predict a folder, a file or DICOM series: one segmentation and one report per case.

Inputs: see ``autoliver.io.inputs`` (``discover_inputs``, ``--shard I/N``).

Outputs per case, in ``output``: ``<case>.json`` (the report), ``<case>.npz`` (float16
probabilities, on request), then ``<case>.nii.gz`` last: a case whose segmentation exists is
finished and is skipped unless ``overwrite``. Every file is written atomically.

A case that fails (unreadable, invalid) is logged with its path and the reason; the others
are still predicted and the summary lists the failures (the CLI then exits non-zero). The
output folder is made and proven writable before any network runs; a write that fails there
(disk full, permission denied) stops the run with an error naming the output file, since every
later case would fail the same way: the cases finished before it are intact, the failed one
leaves only a hidden temporary file, which the next run removes.
The next case is read and preprocessed in a background thread while the network runs on the
current one (numpy, SciPy and torch release the GIL for their heavy work); at most two cases
are in memory at once. Each case's report records, in ``runtime_s``, the time spent waiting
for its input (``wait_input_s``: 0 when the prefetch was ahead), in the network and in the
export, and the wall-clock times (``events``) at which its input was ready and it finished.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from autoliver import __version__
from autoliver.core.errors import UsageError
from autoliver.evaluate.case_report import case_report
from autoliver.infer.ensemble import Ensemble
from autoliver.infer.nnunet_model import NnunetModel, predict_nnunet_case, prepare_case
from autoliver.infer.pipeline import ROI_DEFAULT, TILES_DEFAULT, as_ensemble, predict_case, roi_mode
from autoliver.infer.predictor import TILE_MB, Model, preprocess_for
from autoliver.infer.roi import MARGIN_MM
from autoliver.io.atomic import atomic_path, check_writable, remove_stale_temporaries, write_json
from autoliver.io.images import dicom_series_files, write_image
from autoliver.io.inputs import InputCase, discover_inputs, select_shard
from autoliver.io.validate import read_checked_image

log = logging.getLogger(__name__)

OUTPUT_SUFFIX = ".nii.gz"


@dataclass(frozen=True)
class PredictOptions:
    tta: bool = True
    step: float = 0.5
    save_probabilities: bool = False
    overwrite: bool = False
    progress: bool = True
    shard: tuple[int, int] | None = None  # (index, count)
    prefetch: bool = True
    roi: bool | str = ROI_DEFAULT  # ROI-first inference: auto, on, off (autoliver.infer.roi)
    roi_margin_mm: float = MARGIN_MM
    precision: str = "auto"  # the models' precision (applied when they are loaded: api.predict)
    series_uid: str | None = None  # the DICOM series to read from a folder holding several
    output_format: str = "nifti"  # nifti | dicom-seg | both (DICOM-SEG: for DICOM series inputs)
    engine: str = "torch"  # torch | onnxruntime | openvino | auto (autoliver.infer.engines; applied when the models are loaded)
    tiles: str = TILES_DEFAULT  # 3d inference tiles: auto | patch (autoliver.infer.predictor.throughput_tiling)
    tile_mb: float = TILE_MB  # "auto" tiles: the largest tile's activations in MiB


@dataclass
class PredictSummary:
    output: Path
    predicted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # case -> message
    seconds: dict[str, float] = field(default_factory=dict)  # case -> total seconds
    timings: dict[str, dict[str, float]] = field(default_factory=dict)  # case -> seconds per stage
    events: dict[str, dict[str, float]] = field(default_factory=dict)  # case -> wall-clock times (input_ready, finished)

    def stage_totals(self) -> dict[str, float]:
        """Seconds per stage summed over the predicted cases (wait_input_s, network_s, export_s, ...)."""
        out: dict[str, float] = {}
        for t in self.timings.values():
            for k, v in t.items():
                out[k] = out.get(k, 0.0) + v
        return out


OUTPUT_FORMATS = ("nifti", "dicom-seg", "both")
SEG_SUFFIX = ".dcm"


def output_path(output: Path, case_id: str) -> Path:
    return Path(output) / f"{case_id}{OUTPUT_SUFFIX}"


def done_path(output: Path, case_id: str, output_format: str = "nifti") -> Path:
    """The file written last for a case, whose presence marks it finished."""
    return Path(output) / f"{case_id}{SEG_SUFFIX}" if output_format == "dicom-seg" else output_path(output, case_id)


def check_output_format(cases: list[InputCase], output_format: str) -> None:
    """DICOM-SEG refers to a source series: refuse it for inputs that are not DICOM series."""
    if output_format not in OUTPUT_FORMATS:
        raise UsageError(f"--output-format {output_format!r}: choose one of {', '.join(OUTPUT_FORMATS)}")
    if output_format != "nifti":
        files = [str(c.path) for c in cases if not c.path.is_dir()]
        if files:
            raise UsageError(f"--output-format {output_format} needs DICOM series inputs (it refers to their slices); "
                             f"not a DICOM series: {', '.join(files[:5])}{' ...' if len(files) > 5 else ''}; use --output-format nifti")


def _write_segmentation(output: Path, case: InputCase, seg: np.ndarray, geometry, options: PredictOptions) -> None:
    """The case's label files: the DICOM-SEG first, the NIfTI last (it marks the case done)."""
    if options.output_format in ("dicom-seg", "both"):
        from autoliver.io.dicom_seg import write_dicom_seg  # highdicom: imported only when asked for

        files = dicom_series_files(case.path, options.series_uid)
        write_dicom_seg(seg, files, output / f"{case.case_id}{SEG_SUFFIX}", geometry=geometry)
    if options.output_format in ("nifti", "both"):
        write_image(output_path(output, case.case_id), seg, geometry)


def _load(model: Ensemble | NnunetModel, case: InputCase, series_uid: str | None = None):
    """Read and preprocess one case: (geometry, prepared, read seconds, preprocess seconds, ready time)."""
    t0 = time.perf_counter()
    image, geometry = read_checked_image(case.path, series_uid)  # int16 CT stays int16 until normalisation
    t1 = time.perf_counter()
    prepared = prepare_case(model, image, geometry) if isinstance(model, NnunetModel) else preprocess_for(model, image, geometry)
    del image
    return geometry, prepared, t1 - t0, time.perf_counter() - t1, time.time()


def _finish(model: Ensemble | NnunetModel, case: InputCase, loaded, output: Path, options: PredictOptions, wait_s: float) -> tuple[dict, dict]:
    geometry, prepared, t_read, t_pre, ready_at = loaded
    if isinstance(model, NnunetModel):  # nnU-Net's own pipeline (autoliver.infer.nnunet_model); no ROI
        result = predict_nnunet_case(model, prepared, geometry, tta=options.tta, step=options.step,
                                     save_probabilities=options.save_probabilities)
    else:
        result = predict_case(model, None, geometry, tta=options.tta, step=options.step, save_probabilities=options.save_probabilities,
                              prepared=prepared, roi=options.roi, roi_margin_mm=options.roi_margin_mm, tiles=options.tiles,
                              tile_mb=options.tile_mb)
    t0 = time.perf_counter()
    timings = {"read_s": t_read, "preprocess_s": t_pre, "wait_input_s": wait_s, **result.timings}
    if result.probabilities is not None:
        with atomic_path(output / f"{case.case_id}.npz", suffix=".npz") as tmp:
            np.savez_compressed(tmp, probabilities=result.probabilities)
    t1 = time.perf_counter()
    folds = list(dict.fromkeys(f for names in result.info["folds"].values() for f in names))
    report = case_report(result.seg, geometry, configuration="+".join(result.info["configurations"]), folds=folds,
                         version=__version__, timings={**timings, "report_s": 0.0},
                         extra={"case": case.case_id, "input": str(case.path), "tta": options.tta, "step": options.step,
                                "arch": "+".join(dict.fromkeys(result.info["arch"].values())), "models": result.info,
                                "roi": result.info["roi"], "tiles": result.info.get("tiles"), "precision": result.info["precision"],
                                "postprocessing": [s["name"] for s in result.info["postprocessing"]]})
    t2 = time.perf_counter()
    timings["report_s"] = t2 - t1
    timings["export_s"] = timings.get("export_s", 0.0) + (t1 - t0)  # + writing the probabilities
    report["runtime_s"] = {k: round(float(v), 4) for k, v in timings.items()}
    report["events"] = {"input_ready": ready_at, "finished": time.time()}  # wall-clock (epoch seconds)
    write_json(output / f"{case.case_id}.json", report)
    _write_segmentation(output, case, result.seg, geometry, options)  # last: marks the case done
    timings["export_s"] += time.perf_counter() - t2
    return timings, report["events"]


def _writing_output(exc: OSError, output: Path) -> bool:
    names = [Path(f) for f in (exc.filename, exc.filename2) if f]
    return any(n.resolve().is_relative_to(output.resolve()) for n in names)


def predict_inputs(model: Model | Ensemble | NnunetModel, source: str | Path, output: str | Path,
                   options: PredictOptions = PredictOptions()) -> PredictSummary:
    """Predict every (not yet predicted) case of ``source`` into ``output`` (an nnU-Net model:
    ``autoliver.infer.nnunet_model``, ROI off)."""
    model = model if isinstance(model, NnunetModel) else as_ensemble(model)
    output = Path(output).expanduser()
    cases = select_shard(discover_inputs(source), options.shard)
    check_output_format(cases, options.output_format)
    check_writable(output)
    remove_stale_temporaries(output)
    summary = PredictSummary(output)
    todo = []
    for case in cases:
        if done_path(output, case.case_id, options.output_format).exists() and not options.overwrite:
            summary.skipped.append(case.case_id)
        else:
            todo.append(case)
    if summary.skipped:
        log.info("%d case(s) already predicted in %s (use --overwrite to redo them)", len(summary.skipped), output)
    log.info("predicting %d case(s) with %s on %s (ROI %s)", len(todo), ", ".join(f"{c} folds {'/'.join(f)}" for c, f in model.folds.items()),
             model.device, "off" if isinstance(model, NnunetModel) else roi_mode(options.roi))
    bar = tqdm(total=len(todo), desc="predict", unit="case", disable=not options.progress)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="autoliver-prefetch") if options.prefetch else None
    try:
        def submit(case: InputCase) -> Future:
            if pool is not None:
                return pool.submit(_load, model, case, options.series_uid)
            fut: Future = Future()
            try:
                fut.set_result(_load(model, case, options.series_uid))
            except Exception as exc:  # noqa: BLE001 - reported per case below
                fut.set_exception(exc)
            return fut

        pending = submit(todo[0]) if todo else None
        for i, case in enumerate(todo):
            current = pending
            pending = submit(todo[i + 1]) if pool is not None and i + 1 < len(todo) else None
            loaded = None
            try:
                t_wait = time.perf_counter()
                loaded = current.result()
                wait_s = time.perf_counter() - t_wait if pool is not None else 0.0
                timings, events = _finish(model, case, loaded, output, options, wait_s)
                summary.timings[case.case_id] = timings
                summary.events[case.case_id] = events
                summary.seconds[case.case_id] = sum(v for k, v in timings.items() if k not in ("read_s", "preprocess_s")) + \
                    (0.0 if pool is not None else timings["read_s"] + timings["preprocess_s"])
                summary.predicted.append(case.case_id)
                log.info("%s: %s (%.1f s)", case.case_id, done_path(output, case.case_id, options.output_format), summary.seconds[case.case_id])
            except OSError as exc:
                if _writing_output(exc, output):
                    raise  # the output folder, not this case: every later case would fail the same way
                summary.failed[case.case_id] = str(exc) if exc.filename else f"{case.path}: {exc}"
                log.error("%s: failed: %s", case.case_id, summary.failed[case.case_id])
            except Exception as exc:  # noqa: BLE001 - one bad case must not stop the others
                message = str(exc) if str(case.path) in str(exc) else f"{case.path}: {exc}"
                summary.failed[case.case_id] = message
                log.error("%s: failed: %s", case.case_id, summary.failed[case.case_id])
                log.debug("traceback", exc_info=True)
            finally:
                del current, loaded  # the case's arrays go before the next case's are loaded
            if pending is None and pool is None and i + 1 < len(todo):
                pending = submit(todo[i + 1])
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return summary
