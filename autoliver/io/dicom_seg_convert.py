"""Convert a folder of DICOM studies (CT series + the DICOM-SEG objects made on them) into a raw
dataset in nnU-Net v2 layout::

    dst/dataset.json                 channel_names {"0": "CT"}, labels background 0 / liver 1 / tumour 2
    dst/imagesTr/<case>_0000.nii.gz  the CT series, as ``read_image`` reads it (SimpleITK)
    dst/labelsTr/<case>.nii.gz       uint8, the DICOM-SEG on the series' grid (``read_dicom_seg``)

Every file under ``src`` (any depth, hidden names skipped) is read as a DICOM header; files that
are not DICOM are ignored. Each DICOM-SEG is paired with the image series holding the instances
its frames refer to (Referenced SOP Instance UIDs; else its Referenced Series), wherever that
series lies under ``src``; one case per SEG. Series no SEG refers to are left out (logged).
RTSTRUCT objects are not read: they are an error naming the files, as are a SEG whose series
is missing, two SEGs on one series, and segments that cannot be mapped to liver / tumour (all
problems are listed at once, before anything is written).

Case ids come from the series' Patient ID (or, as chosen, Study / Series Instance UID, or a
running number), made plain: anything but letters, digits, '_' and '-' becomes '_', at most
64 characters, so no tag value can name a path outside the dataset; ids that collide
(case-insensitively) get ``_1``, ``_2``... in study date / UID order.

The dataset is built in a temporary sibling folder and renamed onto ``dst`` when complete.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autoliver.core.errors import ImageReadError, UsageError
from autoliver.core.layout import inside, plain_name
from autoliver.io.atomic import write_json
from autoliver.io.convert import FILE_ENDING, OUTPUT_LABELS, _building, _check_dst
from autoliver.io.dicom_seg import SEGMENTATION_STORAGE, read_dicom_seg
from autoliver.io.dicom_seg_codes import DicomSegError, check_mapping, resolve_mapping, segment_infos
from autoliver.io.dicom_series_headers import SeriesSlices, class_uid, instance_uid, read_series_slices, same_geometry
from autoliver.io.images import Geometry, check_geometry

log = logging.getLogger(__name__)

RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
CASE_ID_SOURCES = ("patient", "study", "series", "index")
MAX_CASE_ID = 64
_NOT_PLAIN = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class SegCase:
    """One DICOM-SEG and the files of the image series it was made on."""

    seg: Path
    series_files: tuple[Path, ...]
    tags: Mapping[str, str]  # PatientID, StudyInstanceUID, SeriesInstanceUID, StudyDate, SeriesNumber of the series


def plain_case_id(text: str) -> str:
    """``text`` (a DICOM tag value) as a plain case id: letters, digits, '_' and '-' only."""
    return _NOT_PLAIN.sub("_", str(text)).strip("_-")[:MAX_CASE_ID].strip("_-")


def _read(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except (InvalidDicomError, EOFError, ValueError, OSError, KeyError, TypeError):
        return None


def _referenced_uids(ds) -> tuple[set[str], set[str]]:
    """(instance UIDs, series UIDs) a SEG's header refers to."""
    instances: set[str] = set()
    series: set[str] = set()
    for item in ds.get("ReferencedSeriesSequence") or []:
        if item.get("SeriesInstanceUID"):
            series.add(str(item.SeriesInstanceUID))
        instances |= {str(r.ReferencedSOPInstanceUID) for r in item.get("ReferencedInstanceSequence") or [] if r.get("ReferencedSOPInstanceUID")}
    for fg in ds.get("PerFrameFunctionalGroupsSequence") or []:
        for derivation in fg.get("DerivationImageSequence") or []:
            instances |= {str(s.ReferencedSOPInstanceUID) for s in derivation.get("SourceImageSequence") or [] if s.get("ReferencedSOPInstanceUID")}
    return instances, series


def _tags(ds) -> dict[str, str]:
    return {k: str(ds.get(k, "") or "").strip() for k in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "StudyDate", "SeriesNumber")}


def find_seg_cases(src: Path, mapping: Mapping[str, int] | None = None) -> list[SegCase]:
    """Pair every DICOM-SEG under ``src`` with its image series (module docstring); one
    DicomSegError listing every problem (RTSTRUCT, missing series, unmappable segments)."""
    segs: list[tuple[Path, object]] = []
    rtstructs: list[Path] = []
    series_files: dict[tuple, list[Path]] = defaultdict(list)
    series_tags: dict[tuple, dict[str, str]] = {}
    by_instance: dict[str, tuple] = {}
    by_series_uid: dict[str, tuple] = {}
    for path in sorted(src.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(src).parts):
            continue
        ds = _read(path)
        if ds is None:
            continue
        sop_class = class_uid(ds)
        if sop_class == SEGMENTATION_STORAGE:
            segs.append((path, ds))
        elif sop_class == RTSTRUCT_STORAGE or str(ds.get("Modality", "")) == "RTSTRUCT":
            rtstructs.append(path)
        elif ds.get("ImagePositionPatient") is not None and ds.get("Rows"):
            uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
            key = ("uid", uid) if uid else ("folder", str(path.parent), str(ds.get("FrameOfReferenceUID", "")))
            series_files[key].append(path)
            series_tags.setdefault(key, _tags(ds))
            by_instance[instance_uid(ds)] = key
            if uid:
                by_series_uid[uid] = key
    problems = [f"{p}: an RTSTRUCT (contours), which autoliver does not read; convert it to DICOM-SEG first or move it out of {src}" for p in rtstructs]
    if not segs and not problems:
        raise DicomSegError(f"{src}: no DICOM-SEG file found (searched all sub-folders); give the folder holding the CT series and their DICOM-SEG objects")
    cases: list[SegCase] = []
    used: dict[tuple, Path] = {}
    for path, ds in segs:
        try:
            resolve_mapping(segment_infos(ds), mapping, path)
        except DicomSegError as exc:
            problems.append(str(exc))
        instances, series_uids = _referenced_uids(ds)
        keys = {by_instance[u] for u in instances if u in by_instance} or {by_series_uid[u] for u in series_uids if u in by_series_uid}
        if len(keys) != 1:
            what = f"{len(instances)} image(s) of series {', '.join(sorted(series_uids)) or '(not named)'}"
            problems.append(f"{path}: refers to {what}, " + ("which are not under " + str(src) + "; copy the CT series it was made on next to it"
                                                              if not keys else f"found in {len(keys)} different series; keep one copy of the series"))
            continue
        key = keys.pop()
        if key in used:
            problems.append(f"{path}: refers to the same series as {used[key]}; one DICOM-SEG per series: merge them or move one out of {src}")
            continue
        used[key] = path
        cases.append(SegCase(path, tuple(series_files[key]), series_tags[key]))
    if problems:
        raise DicomSegError(problems)
    for key in sorted(set(series_files) - set(used), key=str):
        log.info("%s: series %s has no DICOM-SEG; left out", series_files[key][0].parent, key[1])
    return cases


def assign_case_ids(cases: list[SegCase], source: str = "patient") -> list[str]:
    """One unique plain case id per case, from ``source`` (one of CASE_ID_SOURCES)."""
    if source not in CASE_ID_SOURCES:
        raise UsageError(f"case id source {source!r} unknown; choose one of {', '.join(CASE_ID_SOURCES)}")
    order = {"patient": ("PatientID", "StudyInstanceUID", "SeriesInstanceUID"), "study": ("StudyInstanceUID", "SeriesInstanceUID"),
             "series": ("SeriesInstanceUID",), "index": ()}[source]
    bases = []
    for case in cases:
        base = next((b for b in (plain_case_id(case.tags.get(k, "")) for k in order) if b), "case")
        bases.append(base)
    ranked = sorted(range(len(cases)), key=lambda i: (cases[i].tags.get("StudyDate", ""), cases[i].tags.get("StudyInstanceUID", ""),
                                                      cases[i].tags.get("SeriesNumber", ""), cases[i].tags.get("SeriesInstanceUID", ""), str(cases[i].seg)))
    counts: dict[str, int] = defaultdict(int)
    for b in bases:
        counts[b.lower()] += 1
    ids: list[str | None] = [None] * len(cases)
    taken = {b.lower() for b in bases if counts[b.lower()] == 1}
    next_number: dict[str, int] = defaultdict(int)
    for i in ranked:
        base = bases[i]
        if counts[base.lower()] == 1 and source != "index":
            ids[i] = base
            continue
        while True:
            next_number[base.lower()] += 1
            candidate = f"{base}_{next_number[base.lower()]:03d}" if source == "index" else f"{base}_{next_number[base.lower()]}"
            if candidate.lower() not in taken:
                break
        taken.add(candidate.lower())
        ids[i] = candidate
    return [plain_name(c, "case id") for c in ids]


def read_series_image(slices: SeriesSlices) -> sitk.Image:
    """The series as a SimpleITK image, its slices stacked in ``slices`` order."""
    folder = slices.files[0].parent
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in slices.files])
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise ImageReadError(f"{folder}: the DICOM series cannot be read as an image ({str(exc).strip().splitlines()[-1][:200]}); re-export it") from None
    check_geometry(folder, image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    return image


def _write_case(case: SegCase, case_id: str, root: Path, mapping: Mapping[str, int] | None) -> int:
    """Write one case's image and label under ``root``; returns its labelled voxel count."""
    slices = read_series_slices(case.series_files)
    image = read_series_image(slices)
    if not same_geometry(Geometry.of(image), slices.geometry):
        raise ImageReadError(f"{slices.files[0].parent}: the series' slice headers ({slices.geometry}) and its image ({Geometry.of(image)}) "
                             "disagree; re-export the series")
    labels, _ = read_dicom_seg(case.seg, slices, mapping)
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(image)
    sitk.WriteImage(image, str(inside(root / "imagesTr", f"{case_id}_0000{FILE_ENDING}", "case id", str(case.seg))), True)
    sitk.WriteImage(label_image, str(inside(root / "labelsTr", f"{case_id}{FILE_ENDING}", "case id", str(case.seg))), True)
    return int(np.count_nonzero(labels))


def convert_dicom_seg(
    source: str | os.PathLike,
    output: str | os.PathLike,
    mapping: Mapping[str, int] | None = None,
    *,
    case_ids: str = "patient",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert ``source`` (DICOM CT series + DICOM-SEG, any folder structure) into the raw
    dataset ``output`` (named DatasetNNN_Name); returns ``output``.

    ``mapping``: segment label -> 0 (ignore), 1 (liver) or 2 (tumour), e.g. ``{"Liver": 1,
    "Tumor": 2}``; None infers it from segment labels and codes (``dicom_seg_codes``).
    ``case_ids``: where case ids come from, one of CASE_ID_SOURCES (module docstring).
    """
    from tqdm import tqdm

    from autoliver.core.layout import DATASET_NAME_RE

    src, dst = Path(source), Path(output)
    if not src.is_dir():
        raise DicomSegError(f"{src}: no such folder; give the folder holding the DICOM CT series and their DICOM-SEG files")
    if mapping is not None:
        check_mapping(mapping)
    if case_ids not in CASE_ID_SOURCES:
        raise UsageError(f"case id source {case_ids!r} unknown; choose one of {', '.join(CASE_ID_SOURCES)}")
    _check_dst(dst, overwrite)  # before the scan: a bad output name fails at once
    cases = find_seg_cases(src, mapping)
    ids = assign_case_ids(cases, case_ids)
    with _building(dst, overwrite) as tmp:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        for case, case_id in tqdm(list(zip(cases, ids)), desc=f"convert to {dst.name}", unit="case", disable=not progress):
            voxels = _write_case(case, case_id, tmp, mapping)
            log.info("%s <- %s (series %s, %d labelled voxels)", case_id, case.seg, case.tags.get("SeriesInstanceUID") or case.series_files[0].parent, voxels)
        write_json(tmp / "dataset.json", {
            "name": DATASET_NAME_RE.match(dst.name)["name"],
            "description": "Converted from DICOM CT series and their DICOM-SEG segmentations",
            "channel_names": {"0": "CT"},
            "labels": dict(OUTPUT_LABELS),
            "numTraining": len(cases),
            "file_ending": FILE_ENDING,
        })
    log.info("wrote %s: %d training cases from DICOM-SEG", dst, len(cases))
    return dst
