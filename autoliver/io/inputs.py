"""Prediction inputs: which cases a file or folder holds, and how N jobs split them.

``discover_inputs`` accepts a single image file; a folder of image files (NIfTI, NRRD,
MHA/MHD; nnU-Net's ``<case>_0000`` naming accepted, other channel suffixes refused since
autoliver takes CT only); a DICOM folder (one series, one case); or a folder of DICOM series
folders (one case each; DICOM files loose next to them are ignored). Cases are sorted by id;
``select_shard`` keeps those whose index in that order is I modulo N. No torch here: listing
inputs stays cheap for every command that needs it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from autoliver.core.errors import UsageError
from autoliver.io.dataset import CHANNEL_RE
from autoliver.io.images import image_suffix, is_dicom_folder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputCase:
    case_id: str
    path: Path  # an image file or a DICOM series folder


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m or int(m[2]) < 1 or int(m[1]) >= int(m[2]):
        raise UsageError(f"--shard must be I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
    return int(m[1]), int(m[2])


def _case_id(path: Path) -> tuple[str, str | None]:
    """(case id, channel or None) of an image file name."""
    stem = path.name[: -len(image_suffix(path))]
    m = CHANNEL_RE.match(stem)
    return (m["case"], m["channel"]) if m else (stem, None)


def discover_inputs(source: str | Path) -> list[InputCase]:
    """The cases under ``source`` sorted by id (see the module docstring)."""
    source = Path(source).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"{source}: input not found; give an image file, a folder of images or DICOM series folders")
    if source.is_file():
        if image_suffix(source) is None:
            raise UsageError(f"{source}: not a recognised image (NIfTI, NRRD, MHA/MHD); give a folder for DICOM")
        return [InputCase(_case_id(source)[0], source)]
    cases: dict[str, Path] = {}
    for child in sorted(source.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_file() and image_suffix(child):
            case, channel = _case_id(child)
            if channel not in (None, "0000"):
                log.warning("%s: channel %s ignored (autoliver takes one CT channel, _0000)", child, channel)
                continue
        elif child.is_dir() and is_dicom_folder(child):
            case = child.name
        else:
            continue
        if case in cases:
            raise UsageError(f"{source}: case {case!r} given twice ({cases[case].name} and {child.name}); keep one")
        cases[case] = child
    if not cases and is_dicom_folder(source):  # the folder is one DICOM series
        return [InputCase(source.name, source)]
    if cases and any(c.is_file() and not image_suffix(c) for c in source.iterdir()) and is_dicom_folder(source):
        log.warning("%s: DICOM files next to the cases' files/folders are ignored; put each series in its own folder", source)
    if not cases:
        raise UsageError(f"{source}: no images (NIfTI, NRRD, MHA/MHD) and no DICOM series folders found")
    return [InputCase(c, p) for c, p in sorted(cases.items())]


def select_shard(cases: list[InputCase], shard: tuple[int, int] | None) -> list[InputCase]:
    if shard is None:
        return list(cases)
    index, count = shard
    return [c for i, c in enumerate(cases) if i % count == index]
