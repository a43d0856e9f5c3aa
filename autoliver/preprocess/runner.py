"""Preprocess a whole dataset: every training case, every data identifier, resumable.

    <out_root>/<data_identifier>/<case>.b2nd, <case>_seg.b2nd, <case>.json
    <out_root>/<data_identifier>/dataset_properties.json   (written last, atomically)

Each case is read and cropped once and all its data identifiers are produced from that crop
(planned identifiers from one normalised array; identifiers with options resample the HU
first, see ``case.py``). Cases run in parallel with joblib (loky processes), one case per worker at
a time, so memory stays at about n_jobs x one case (peak RSS of a 500 x 512 x 512 int16 case:
see the module notes in ``case.py`` and the project notes). A case counts as done when its
properties JSON exists and records the same plans hash and the same preprocessing options
(``preprocessing_hash``: an identifier's voxel-changing options, ``plans.data_preprocessing``);
finished cases are skipped unless ``overwrite``. Per-case seeds derive from the case id, so
results do not depend on n_jobs. ``dataset_properties.json`` records the options, their hash
and ``pad_value``: what the loader and the sliding window pad images with (``pad_value_for``;
for a per-image z-score, the minimum over the cases' recorded values).
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
import zlib
from pathlib import Path

from autoliver.core import faults
from autoliver.core.layout import PLANS
from autoliver.core.parallel import parallel_map
from autoliver.io.atomic import remove_stale_temporaries, write_json
from autoliver.io.dataset import Case, RawDataset
from autoliver.io.images import read_image
from autoliver.preprocess.case import iter_preprocessed
from autoliver.preprocess.intensity import NO_OPTIONS_HASH, options_for, options_hash
from autoliver.preprocess.normalise import air_pad_value, pad_is_recorded, pad_value_for
from autoliver.preprocess.storage import case_done, list_cases, load_properties, save_case
from planning.plans import Normalisation, Plans

log = logging.getLogger(__name__)

DATASET_PROPERTIES = "dataset_properties.json"


def case_seed(case_id: str) -> int:
    """Stable per-case seed (crc32 of the id), recorded in the case's properties."""
    return zlib.crc32(case_id.encode("utf-8")) & 0x7FFFFFFF


def _is_current(folder: Path, case_id: str, plans_hash: str, preprocessing_hash: str = NO_OPTIONS_HASH, data_hash: str | None = None) -> bool:
    """Done, from the same inputs: the data folder's own hash (``Plans.data_hash``: spacing,
    options, normalisation; adding a configuration to the plans leaves it unchanged), or for a
    case written before that hash existed the whole plans' hash; and the same voxel-changing
    options (a case written before options existed records none: current for a planned identifier)."""
    if not case_done(folder, case_id):
        return False
    props = load_properties(folder, case_id)
    same_inputs = props.get("data_hash") == data_hash if "data_hash" in props and data_hash is not None else props.get("plans_hash") == plans_hash
    return same_inputs and props.get("preprocessing_hash", NO_OPTIONS_HASH) == preprocessing_hash


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _process_case(case: Case, plans_json: dict, out_root: Path, identifiers: list[str]) -> tuple[str, float, float, dict]:
    """Worker: read one case, preprocess it for every identifier, save.
    Returns (id, s, MB, {identifier: recorded pad value})."""
    faults.point("preprocess.case")
    t0 = time.perf_counter()
    plans = Plans.from_json(plans_json)
    plans_hash = plans_json["plans_hash"]
    image, geometry = read_image(case.images[0])
    label = None
    if case.label is not None:
        label, _ = read_image(case.label)
    seed = case_seed(case.case_id)
    pads = {}
    for ident, data, seg, props in iter_preprocessed(image, geometry, label, plans, identifiers, seed=seed):
        props["plans_hash"] = plans_hash
        props["data_hash"] = plans.data_hash(ident)
        props["source_image"] = str(case.images[0].name)
        save_case(out_root / ident, case.case_id, data, seg, props)
        pads[ident] = props["pad_value"]
        del data, seg
    return case.case_id, time.perf_counter() - t0, _peak_rss_mb(), pads


def _folder_pad_value(plans: Plans, ident: str, folder: Path, cases: list[str], fresh: dict[str, dict]) -> float:
    """The data folder's pad value: the plan's for fixed mappings; for a per-image one the
    minimum of the cases' recorded values (this run's, else read from their properties)."""
    if not pad_is_recorded(plans, ident):
        return pad_value_for(plans, ident)
    values = []
    for c in cases:
        v = fresh[c][ident] if c in fresh and ident in fresh[c] else load_properties(folder, c).get("pad_value")
        if v is not None:
            values.append(float(v))
    return pad_value_for(plans, ident, min(values) if values else None)


def folder_pad_value(folder: Path) -> float:
    """What images of the data folder ``folder`` (``<preprocessed>/<dataset>/<identifier>``)
    are padded with: its ``dataset_properties.json`` ``pad_value``; else ``pad_value_for`` the
    plans.json next to it; else the plan's CT air level; 0 when there is no usable plans.json."""
    folder = Path(folder)
    try:
        recorded = float(json.loads((folder / DATASET_PROPERTIES).read_text(encoding="utf-8"))["pad_value"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        recorded = math.nan
    if math.isfinite(recorded):
        return recorded
    try:
        raw = json.loads((folder.parent / PLANS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.debug("%s: no usable plans.json; padding images with 0", folder.parent)
        return 0.0
    try:
        return pad_value_for(Plans.from_json(raw), folder.name)
    except (ValueError, KeyError, TypeError):
        pass
    try:
        return air_pad_value(Normalisation(**raw["normalisation"]))
    except (KeyError, TypeError, ValueError):
        log.debug("%s: no usable normalisation; padding images with 0", folder.parent)
        return 0.0


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
    hashes = {i: options_hash(options_for(plans, i)) for i in identifiers}
    for case in dataset.training:
        if not overwrite and all(_is_current(out_root / i, case.case_id, plans_hash, hashes[i], plans.data_hash(i)) for i in identifiers):
            skipped.append(case.case_id)
        else:
            todo.append(case)
    log.info("preprocessing %d case(s) for %s (%d already done) with %d job(s)", len(todo), identifiers, len(skipped), n_jobs)
    for ident in identifiers:
        (out_root / ident).mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_root, *(out_root / i for i in identifiers))

    timings, peaks, pads = {}, [], {}
    args = [(case, plans_json, out_root, identifiers) for case in todo]
    for case_id, seconds, peak, case_pads in parallel_map(_process_case, args, n_jobs=n_jobs, progress=progress, desc="preprocess", ordered=False):
        timings[case_id] = round(seconds, 3)
        peaks.append(peak)
        pads[case_id] = case_pads

    training_ids = [c.case_id for c in dataset.training]
    for ident in identifiers:
        folder = out_root / ident
        wanted = set(training_ids)
        cases = [c for c in list_cases(folder) if c in wanted]
        write_json(folder / DATASET_PROPERTIES, {
            "dataset_name": plans.dataset_name,
            "plans_hash": plans_hash,
            "data_hash": plans.data_hash(ident),
            "data_identifier": ident,
            "spacing": list(plans.data_spacings[ident]),
            "normalisation": plans_json["normalisation"],
            "preprocessing": options_for(plans, ident),
            "preprocessing_hash": hashes[ident],
            "pad_value": _folder_pad_value(plans, ident, folder, cases, pads),
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

