"""Fingerprint runner: analyse every training case (in parallel), then reduce.

The per-case analysis and the reduce are pure functions in ``planning.fingerprint``; this
module adds file reading, parallelism (joblib, loky backend), a progress bar and the input
hash. The caller writes ``fingerprint.json`` (atomically, ``autoliver.io.atomic.write_json``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from autoliver.core.errors import DatasetError
from autoliver.core.parallel import parallel_map
from autoliver.io.dataset import DATASET_JSON, Case, RawDataset
from autoliver.io.images import read_image
from planning.fingerprint import analyse_case, reduce_fingerprint
from planning.hashing import hash_json

log = logging.getLogger(__name__)


def case_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for case number ``index`` (in the dataset's sorted case order).

    Derived from (seed, index) only, so results do not depend on n_jobs or scheduling.
    """
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def _analyse_one(case: Case, seed: int, index: int, samples_per_class: int) -> dict:
    """Worker: read one case's CT (channel 0) and label, and analyse it."""
    if case.label is None:
        raise DatasetError(f"case {case.case_id}: has no label file; add labelsTr/{case.case_id} or remove the case")
    image, geometry = read_image(case.images[0])
    label, label_geometry = read_image(case.label)
    if label.shape != image.shape:
        raise DatasetError(
            f"{case.label}: label shape {label.shape} (z, y, x) differs from image shape {image.shape} "
            f"of {case.images[0]}; resample the label onto the image grid (run `autoliver validate`)"
        )
    return analyse_case(image, label, geometry.spacing, geometry.direction, case_rng(seed, index), samples_per_class)


def extract_fingerprint(
    dataset: RawDataset,
    n_jobs: int = 1,
    progress: bool = True,
    seed: int = 1234,
    samples_per_class: int = 10000,
) -> dict:
    """Fingerprint of ``dataset``'s training cases: a JSON-able dict (see planning.fingerprint).

    Cases are analysed by ``n_jobs`` worker processes; each case's random generator comes
    from (seed, case index), so the result is the same for any ``n_jobs``. The seed and the
    input hash are recorded in the result.
    """
    if n_jobs < 1:
        raise ValueError(f"n_jobs must be >= 1, got {n_jobs}")
    cases = sorted(dataset.training, key=lambda c: c.case_id)
    if not cases:
        raise DatasetError(f"{dataset.root}: no training cases; add images to imagesTr and labels to labelsTr")
    log.info("fingerprint: %d cases, %d job(s), seed %d", len(cases), n_jobs, seed)
    args = [(c, seed, i, samples_per_class) for i, c in enumerate(cases)]
    results_iter = parallel_map(_analyse_one, args, n_jobs=n_jobs, progress=progress, desc="fingerprint")
    results = {case.case_id: result for case, result in zip(cases, results_iter)}
    fingerprint = reduce_fingerprint(results, dataset.dataset_json, dataset.name, dataset_input_hash(dataset))
    fingerprint["seed"] = int(seed)
    fingerprint["samples_per_class"] = int(samples_per_class)
    return fingerprint


def _file_entries(path: Path, root: Path) -> list[list]:
    """[relative path, size, mtime_ns] of a file, or of every file inside a DICOM folder."""
    paths = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    out = []
    for p in paths:
        st = p.stat()
        if p.is_relative_to(root):
            rel = p.relative_to(root).as_posix()
        elif p.resolve().is_relative_to(root.resolve()):
            rel = p.resolve().relative_to(root.resolve()).as_posix()
        else:
            rel = p.as_posix()
        out.append([rel, int(st.st_size), int(st.st_mtime_ns)])
    return out


def dataset_input_hash(dataset: RawDataset) -> str:
    """A cheap hash of what the fingerprint is built from.

    It covers the content of dataset.json and, for every training image and label file (every
    file of a DICOM folder), its path relative to the dataset folder, its size in bytes and
    its modification time in nanoseconds. File contents are not read, so hashing is instant
    even for large datasets; an edit that keeps both size and mtime (rare: ``touch -r`` or a
    copy that preserves times of a same-size file) goes unnoticed.
    """
    root = Path(dataset.root)
    dj_path = root / DATASET_JSON
    dj_text = dj_path.read_text(encoding="utf-8") if dj_path.is_file() else ""
    entries = []
    for case in sorted(dataset.training, key=lambda c: c.case_id):
        for p in (*case.images, *((case.label,) if case.label is not None else ())):
            if os.path.exists(p):
                entries.extend(_file_entries(Path(p), root))
            else:
                entries.append([str(p), -1, -1])
    return hash_json({"dataset_json": dj_text, "files": entries})
