"""Convert MSD Task03_Liver or raw LiTS folders into a raw dataset in nnU-Net v2 layout.

Output (``dst`` must be named ``DatasetNNN_Name``)::

    dst/dataset.json                 channel_names {"0": "CT"}, labels background/liver/tumour
    dst/imagesTr/<case>_0000.nii.gz
    dst/labelsTr/<case>.nii.gz       uint8
    dst/imagesTs/<case>_0000.nii.gz

Case ids are ``liver_N`` for training volumes in both layouts (MSD ``liver_N`` is LiTS
``volume-N``), and ``liver_N`` / ``liver_test_N`` for test volumes (MSD / LiTS).

Files that already are ``.nii.gz`` (and, for labels, already uint8) are copied byte for byte:
the bytes, and so the geometry, are exactly the source's, and it is several times faster than
decompressing and recompressing. Everything else is read and rewritten with SimpleITK, which
keeps the geometry SimpleITK reads (spacing, origin, direction) and the voxel type of images;
labels are cast to uint8 after checking their values are integers in 0..255.

The dataset is built in a temporary sibling folder and renamed onto ``dst`` at the end, so a
failure leaves nothing half-written; an existing non-empty ``dst`` is replaced only with
``overwrite=True``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autoliver.core.errors import DatasetError, UsageError
from autoliver.core.layout import DATASET_NAME_RE
from autoliver.io.atomic import atomic_dir, write_json
from autoliver.io.images import check_nifti_complete, read_header, read_sitk
from autoliver.io.jsonfile import read_json

log = logging.getLogger(__name__)

OUTPUT_LABELS = {"background": 0, "liver": 1, "tumour": 2}
FILE_ENDING = ".nii.gz"

# (kind, source path, destination path relative to the new dataset)
_Job = tuple[str, Path, str]


def _check_dst(dst: Path, overwrite: bool) -> None:
    if not DATASET_NAME_RE.match(dst.name):
        raise UsageError(
            f"{dst}: the output folder must be named DatasetNNN_Name (three digits, then letters, "
            f"digits, '_' or '-'), e.g. Dataset003_Liver; got {dst.name!r}"
        )
    if dst.exists() and not dst.is_dir():
        raise DatasetError(f"{dst}: exists and is not a folder; choose another output path")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise DatasetError(f"{dst}: exists and is not empty; choose another output folder or pass overwrite=True (--overwrite) to replace it")


def _copy_or_convert(kind: str, src: Path, target: Path) -> None:
    """Write ``src`` to ``target`` (.nii.gz): byte copy when possible, SimpleITK otherwise."""
    is_gz = src.name.lower().endswith(".nii.gz")
    check_nifti_complete(src)  # free for an intact file; a truncated one must not be copied on
    if kind == "image" and is_gz:
        shutil.copyfile(src, target)
        return
    if kind == "label" and is_gz and read_header(src)[2] == sitk.GetPixelIDValueAsString(sitk.sitkUInt8):
        shutil.copyfile(src, target)
        return
    image = read_sitk(src)
    if kind == "label" and image.GetPixelID() != sitk.sitkUInt8:
        array = sitk.GetArrayViewFromImage(image)
        values = np.unique(array)
        if np.any(values != np.round(values)) or values.min() < 0 or values.max() > 255:
            raise DatasetError(
                f"{src}: label values {values[:10].tolist()} are not integers in 0..255; fix the label map "
                "(nearest-neighbour resampling keeps labels integral)"
            )
        converted = sitk.GetImageFromArray(np.asarray(array).astype(np.uint8))
        converted.CopyInformation(image)
        image = converted
    sitk.WriteImage(image, str(target), True)


@contextlib.contextmanager
def _building(dst: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling of ``dst``; on success put it in ``dst``'s place, else remove it."""
    _check_dst(dst, overwrite)
    with atomic_dir(dst) as tmp:
        yield tmp


def _write_dataset(dst: Path, jobs: list[_Job], n_training: int, description: str, overwrite: bool, progress: bool) -> Path:
    from tqdm import tqdm

    with _building(dst, overwrite) as tmp:
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            (tmp / sub).mkdir()
        for kind, src, rel in tqdm(jobs, desc=f"convert to {dst.name}", unit="file", disable=not progress):
            _copy_or_convert(kind, src, tmp / rel)
        if not any((tmp / "imagesTs").iterdir()):
            (tmp / "imagesTs").rmdir()
        m = DATASET_NAME_RE.match(dst.name)
        write_json(
            tmp / "dataset.json",
            {
                "name": m["name"],
                "description": description,
                "channel_names": {"0": "CT"},
                "labels": dict(OUTPUT_LABELS),
                "numTraining": n_training,
                "file_ending": FILE_ENDING,
            },
        )
    log.info("wrote %s: %d training cases, %d files", dst, n_training, len(jobs))
    return dst


def _msd_case_id(path: Path, src: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    raise DatasetError(f"{path}: MSD files must be .nii.gz or .nii; {src} does not look like an MSD Task03_Liver folder")


def convert_msd(src: Path, dst: Path, progress: bool = True, overwrite: bool = False) -> Path:
    """MSD Task03_Liver (imagesTr/liver_N.nii.gz, labelsTr/, imagesTs/, dataset.json) -> ``dst``."""
    src, dst = Path(src), Path(dst)
    layout = "MSD Task03_Liver folder (imagesTr/liver_N.nii.gz, labelsTr/liver_N.nii.gz, dataset.json)"
    if not (src / "dataset.json").is_file() or not (src / "imagesTr").is_dir() or not (src / "labelsTr").is_dir():
        raise DatasetError(f"{src}: does not look like an {layout}: dataset.json, imagesTr/ and labelsTr/ are required")
    dj = read_json(src / "dataset.json", DatasetError, "restore the original MSD file")
    problems = []
    labels = {str(k): str(v).lower() for k, v in (dj.get("labels") or {}).items()} if isinstance(dj, dict) else {}
    if set(labels) != {"0", "1", "2"} or "liver" not in labels["1"]:
        raise DatasetError(f'{src / "dataset.json"}: labels {labels} are not the Task03_Liver labels {{"0": background, "1": liver, "2": cancer}}; {src} is not an {layout}')
    if not isinstance(dj.get("training"), list) or not dj["training"]:
        raise DatasetError(f'{src / "dataset.json"}: no "training" list; {src} is not an {layout}')

    jobs: list[_Job] = []
    seen: set[str] = set()
    for entry in dj["training"]:
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            problems.append(f'{src / "dataset.json"}: training entry {entry!r} needs "image" and "label"')
            continue
        image, label = (src / entry["image"]).resolve(), (src / entry["label"]).resolve()
        for p in (image, label):
            if not p.is_relative_to(src.resolve()):
                problems.append(f'{src / "dataset.json"}: {p} lies outside {src}; keep the MSD folder as distributed')
            elif not p.is_file():
                problems.append(f"{p}: listed in {src / 'dataset.json'} but missing; restore it from the MSD archive")
        case_id = _msd_case_id(image, src)
        if case_id in seen:
            problems.append(f'{src / "dataset.json"}: case {case_id} is listed twice')
        seen.add(case_id)
        jobs += [("image", image, f"imagesTr/{case_id}_0000{FILE_ENDING}"), ("label", label, f"labelsTr/{case_id}{FILE_ENDING}")]
    for rel in dj.get("test") or []:
        rel = rel.get("image") if isinstance(rel, dict) else rel
        image = (src / str(rel)).resolve()
        if not image.is_relative_to(src.resolve()) or not image.is_file():
            problems.append(f"{image}: test image listed in {src / 'dataset.json'} is missing or outside {src}; restore it")
            continue
        jobs.append(("image", image, f"imagesTs/{_msd_case_id(image, src)}_0000{FILE_ENDING}"))
    if problems:
        raise DatasetError(problems)
    return _write_dataset(dst, jobs, len(seen), "Converted from the Medical Segmentation Decathlon Task03_Liver", overwrite, progress)


_LITS_RE = re.compile(r"^(?P<kind>volume|segmentation|test-volume)-(?P<n>\d+)\.nii(\.gz)?$")


def convert_lits(src: Path, dst: Path, progress: bool = True, overwrite: bool = False) -> Path:
    """Raw LiTS (volume-N.nii + segmentation-N.nii, in any sub-folders; test-volume-N.nii) -> ``dst``."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise DatasetError(f"{src}: no such folder; give the folder holding the LiTS volume-N.nii / segmentation-N.nii files")
    found: dict[str, dict[int, Path]] = {"volume": {}, "segmentation": {}, "test-volume": {}}
    problems = []
    for path in sorted(src.rglob("*")):
        m = _LITS_RE.match(path.name)
        if not m or not path.is_file() or any(part.startswith(".") for part in path.relative_to(src).parts):
            continue
        kind, n = m["kind"], int(m["n"])
        if n in found[kind]:
            problems.append(f"{path}: duplicate of {found[kind][n]}; keep one copy of {kind}-{n}")
        found[kind][n] = path
    if not found["volume"] and not found["segmentation"]:
        raise DatasetError(f"{src}: no LiTS volume-N.nii / segmentation-N.nii files found (also searched sub-folders such as 'Training Batch 1'); is this the LiTS folder?")
    for n in sorted(set(found["volume"]) - set(found["segmentation"])):
        problems.append(f"{found['volume'][n]}: no matching segmentation-{n}.nii under {src}; add it or remove the volume")
    for n in sorted(set(found["segmentation"]) - set(found["volume"])):
        problems.append(f"{found['segmentation'][n]}: no matching volume-{n}.nii under {src}; add it or remove the segmentation")
    if problems:
        raise DatasetError(problems)
    jobs: list[_Job] = []
    for n in sorted(found["volume"]):
        jobs += [
            ("image", found["volume"][n], f"imagesTr/liver_{n}_0000{FILE_ENDING}"),
            ("label", found["segmentation"][n], f"labelsTr/liver_{n}{FILE_ENDING}"),
        ]
    for n in sorted(found["test-volume"]):
        jobs.append(("image", found["test-volume"][n], f"imagesTs/liver_test_{n}_0000{FILE_ENDING}"))
    return _write_dataset(dst, jobs, len(found["volume"]), "Converted from the LiTS challenge files", overwrite, progress)
