"""Preprocess a whole dataset: every training case, every data identifier, resumable.

    <out_root>/<data_identifier>/<case>.b2nd, <case>_seg.b2nd, <case>.json
    <out_root>/<data_identifier>/dataset_properties.json   (written last, atomically)

Each case is read once and all its data identifiers are produced from the same cropped,
normalised array. Cases run in parallel with joblib (loky processes), one case per worker at
a time, so memory stays at about n_jobs x one case (peak RSS of a 500 x 512 x 512 int16 case:
see the module notes in ``case.py`` and the project notes). A case counts as done when its
properties JSON exists and records the same plans hash; finished cases are skipped unless
``overwrite``. Per-case seeds derive from the case id, so results do not depend on n_jobs.
"""

from __future__ import annotations

import logging
import resource
import time
import zlib
from pathlib import Path

from autoliver.core.parallel import parallel_map
from autoliver.io.atomic import write_json
from autoliver.io.dataset import Case, RawDataset
from autoliver.io.images import read_image
from autoliver.preprocess.case import iter_preprocessed
from autoliver.preprocess.storage import case_done, list_cases, load_properties, save_case
from planning.plans import Plans

log = logging.getLogger(__name__)

DATASET_PROPERTIES = "dataset_properties.json"


def case_seed(case_id: str) -> int:
    """Stable per-case seed (crc32 of the id), recorded in the case's properties."""
    return zlib.crc32(case_id.encode("utf-8")) & 0x7FFFFFFF


def _is_current(folder: Path, case_id: str, plans_hash: str) -> bool:
    if not case_done(folder, case_id):
        return False
    return load_properties(folder, case_id).get("plans_hash") == plans_hash


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _process_case(case: Case, plans_json: dict, out_root: Path, identifiers: list[str]) -> tuple[str, float, float]:
    """Worker: read one case, preprocess it for every identifier, save. Returns (id, s, MB)."""
    t0 = time.perf_counter()
    plans = Plans.from_json(plans_json)
    plans_hash = plans_json["plans_hash"]
    image, geometry = read_image(case.images[0])
    label = None
    if case.label is not None:
        label, _ = read_image(case.label)
    seed = case_seed(case.case_id)
    for ident, data, seg, props in iter_preprocessed(image, geometry, label, plans, identifiers, seed=seed):
        props["plans_hash"] = plans_hash
        props["source_image"] = str(case.images[0].name)
        save_case(out_root / ident, case.case_id, data, seg, props)
        del data, seg
    return case.case_id, time.perf_counter() - t0, _peak_rss_mb()


def preprocess_dataset(dataset: RawDataset, plans: Plans, out_root: Path, data_identifiers: list[str] | None = None,
                       n_jobs: int = 1, overwrite: bool = False, progress: bool = True) -> dict:
    """Preprocess every training case of ``dataset`` into ``out_root/<data_identifier>/``.

    Returns a summary: identifiers, cases done and skipped, seconds, peak RSS per worker (MB).
    """
    if n_jobs < 1:
        raise ValueError(f"n_jobs must be >= 1, got {n_jobs}")
    out_root = Path(out_root)
    identifiers = sorted(plans.data_spacings) if data_identifiers is None else list(data_identifiers)
    unknown = [i for i in identifiers if i not in plans.data_spacings]
    if unknown:
        raise ValueError(f"data identifiers {unknown} are not in the plan (it has {sorted(plans.data_spacings)})")
    plans_json = plans.to_json()
    plans_hash = plans_json["plans_hash"]
    t0 = time.perf_counter()
    todo, skipped = [], []
    for case in dataset.training:
        if not overwrite and all(_is_current(out_root / i, case.case_id, plans_hash) for i in identifiers):
            skipped.append(case.case_id)
        else:
            todo.append(case)
    log.info("preprocessing %d case(s) for %s (%d already done) with %d job(s)", len(todo), identifiers, len(skipped), n_jobs)
    for ident in identifiers:
        (out_root / ident).mkdir(parents=True, exist_ok=True)

    timings, peaks = {}, []
    args = [(case, plans_json, out_root, identifiers) for case in todo]
    for case_id, seconds, peak in parallel_map(_process_case, args, n_jobs=n_jobs, progress=progress, desc="preprocess", ordered=False):
        timings[case_id] = round(seconds, 3)
        peaks.append(peak)

    training_ids = [c.case_id for c in dataset.training]
    for ident in identifiers:
        folder = out_root / ident
        wanted = set(training_ids)
        cases = [c for c in list_cases(folder) if c in wanted]
        write_json(folder / DATASET_PROPERTIES, {
            "dataset_name": plans.dataset_name,
            "plans_hash": plans_hash,
            "data_identifier": ident,
            "spacing": list(plans.data_spacings[ident]),
            "normalisation": plans_json["normalisation"],
            "cases": cases,
        })
    summary = {
        "data_identifiers": identifiers,
        "done": sorted(timings),
        "skipped": skipped,
        "seconds": round(time.perf_counter() - t0, 3),
        "case_seconds": timings,
        "peak_rss_mb": round(max(peaks), 1) if peaks else None,
    }
    log.info("preprocessing finished: %d done, %d skipped, %.1f s", len(timings), len(skipped), summary["seconds"])
    return summary

