"""What DICOM-SEG segments mean in autoliver's labels (0 background, 1 liver, 2 tumour).

Written segments (``output_segments``):

- segment 1 "Liver": the liver *structure*, labels 1 + 2 (the LiTS "liver", tumours included,
  as ``autoliver.core.labels.STRUCTURES``), category SCT 123037004 "Anatomical Structure",
  type SCT 10200004 "Liver";
- segment 2 "Tumour": label 2, category SCT 49755003 "Morphologically Altered Structure",
  type SCT 108369006 "Neoplasm" (whose SNOMED CT synonym is "Tumor": it says neither primary
  nor metastatic, as the LiTS tumour label does not), anatomic region SCT 10200004 "Liver".

The two segments overlap (every tumour voxel is also a liver voxel), so a viewer shows the whole
liver with its tumours inside, and a label map comes back exactly: tumour wins over liver.

Read segments map to labels by an explicit mapping (segment label -> 0, 1 or 2; 0 ignores the
segment), or are inferred, case-insensitively, from the segment label and, when the label says
nothing, from the segmented property type: a tumour word ("tumor", "tumour", "lesion", "mass",
"neoplasm", "metastasis", "cancer", "carcinoma" and their plurals) -> 2; "liver" (without a
vessel word: "liver vessels" is not the liver) -> 1. Anything else is an error listing the
segments and how to give the mapping.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from autoliver.core.errors import DatasetError, UsageError
from autoliver.core.labels import LABEL_VALUES, LIVER, TUMOUR

ANATOMICAL_STRUCTURE = ("123037004", "SCT", "Anatomical Structure")
MORPHOLOGICALLY_ALTERED = ("49755003", "SCT", "Morphologically Altered Structure")
LIVER_CODE = ("10200004", "SCT", "Liver")
TUMOUR_CODE = ("108369006", "SCT", "Neoplasm")

# property type codes that decide a segment when its label does not (SNOMED CT and the legacy SRT scheme)
LIVER_CODES = {("SCT", "10200004"), ("SRT", "T-62000")}
TUMOUR_CODES = {("SCT", c) for c in ("4147007", "108369006", "86049000", "14799000", "52988006", "93870000", "94381002", "25370001")}
TUMOUR_PREFIXES = ("tumor", "tumour", "lesion", "neoplas", "metasta", "cancer", "carcinom")
TUMOUR_WORDS = {"mass", "masses", "hcc"}
VESSEL_WORDS = {"vessel", "vessels", "vein", "veins", "artery", "arteries", "vasculature", "vascular", "duct", "ducts", "bile", "portal"}
MAPPING_HINT = 'give the mapping by segment label, e.g. --mapping "Liver=1" "Tumor=2" (0 ignores a segment)'


class DicomSegError(DatasetError):
    """A DICOM-SEG object (or the series it refers to) cannot be used; the message names the file."""


@dataclass(frozen=True)
class SegmentInfo:
    """One segment of a DICOM-SEG: its number, label and segmented property type."""

    number: int
    label: str
    type_scheme: str = ""
    type_value: str = ""
    type_meaning: str = ""

    def describe(self) -> str:
        kind = f", type {self.type_meaning} ({self.type_scheme} {self.type_value})" if self.type_value else ""
        return f"#{self.number} {self.label!r}{kind}"


def segment_infos(seg) -> list[SegmentInfo]:
    """The segments of a pydicom/highdicom Segmentation data set."""
    infos = []
    for item in seg.get("SegmentSequence", []) or []:
        types = item.get("SegmentedPropertyTypeCodeSequence") or []
        code = types[0] if types else None
        infos.append(SegmentInfo(
            number=int(item.SegmentNumber),
            label=str(item.get("SegmentLabel", "") or ""),
            type_scheme=str(code.get("CodingSchemeDesignator", "")) if code is not None else "",
            type_value=str(code.get("CodeValue", "")) if code is not None else "",
            type_meaning=str(code.get("CodeMeaning", "")) if code is not None else "",
        ))
    return infos


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[^a-z0-9]+", text.lower()) if w]


def label_from_text(text: str) -> int | None:
    """2 for tumour words, 1 for the liver, None when ``text`` says neither (see module docstring)."""
    words = _words(text)
    if any(w.startswith(TUMOUR_PREFIXES) or w in TUMOUR_WORDS for w in words):
        return TUMOUR
    if "liver" in words and not VESSEL_WORDS.intersection(words):
        return LIVER
    return None


def infer_label(segment: SegmentInfo) -> int | None:
    """A segment's label inferred from its label text, else from its property type; None if unknown."""
    by_label = label_from_text(segment.label)
    if by_label is not None:
        return by_label
    if (segment.type_scheme, segment.type_value) in TUMOUR_CODES:
        return TUMOUR
    if (segment.type_scheme, segment.type_value) in LIVER_CODES:
        return LIVER
    return label_from_text(segment.type_meaning)


def check_mapping(mapping: Mapping[str, int]) -> dict[str, int]:
    """``mapping`` (segment label -> 0/1/2) with lower-cased keys; UsageError for bad values."""
    checked: dict[str, int] = {}
    for key, value in mapping.items():
        if not isinstance(key, str) or not key.strip():
            raise UsageError(f"segment mapping key {key!r} is not a segment label; {MAPPING_HINT}")
        if isinstance(value, bool) or not isinstance(value, int) or value not in LABEL_VALUES:
            raise UsageError(f"segment mapping {key!r}={value!r}: the label must be 0 (ignore), 1 (liver) or 2 (tumour)")
        checked[key.strip().lower()] = int(value)
    return checked


def parse_mapping(items: Sequence[str]) -> dict[str, int]:
    """``["Liver=1", "Liver Tumor=2"]`` (as the command line gives it) -> ``{"Liver": 1, "Liver Tumor": 2}``."""
    mapping: dict[str, int] = {}
    for item in items:
        key, sep, value = str(item).rpartition("=")
        if not sep or not key.strip() or not value.strip().isdigit():
            raise UsageError(f"segment mapping {item!r} is not LABEL=VALUE; {MAPPING_HINT}")
        mapping[key.strip()] = int(value)
    check_mapping(mapping)
    return mapping


def resolve_mapping(segments: Sequence[SegmentInfo], mapping: Mapping[str, int] | None, source: str | Path) -> dict[int, int]:
    """Segment number -> label (0 ignored, 1 liver, 2 tumour) for every segment of ``source``.

    With ``mapping`` a segment is found by its label, else by its property type's meaning
    (case-insensitive); without it, ``infer_label`` decides. A segment left unmapped is a
    DicomSegError listing every such segment and how to map it.
    """
    wanted = check_mapping(mapping) if mapping is not None else None
    result: dict[int, int] = {}
    unknown: list[SegmentInfo] = []
    for segment in segments:
        if wanted is not None:
            value = wanted.get(segment.label.strip().lower(), wanted.get(segment.type_meaning.strip().lower()))
        else:
            value = infer_label(segment)
        if value is None:
            unknown.append(segment)
        else:
            result[segment.number] = value
    if unknown:
        given = f" (mapping given: {dict(mapping)})" if mapping is not None else ""
        raise DicomSegError(f"{source}: segment(s) {', '.join(s.describe() for s in unknown)} cannot be mapped to liver (1) or "
                            f"tumour (2){given}; {MAPPING_HINT}")
    return result


def output_segments(algorithm_name: str, algorithm_version: str) -> list:
    """The two highdicom SegmentDescriptions autoliver writes (module docstring)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(name=algorithm_name, family=codes.cid7162.ArtificialIntelligence, version=algorithm_version)
    code = lambda c: hd.sr.CodedConcept(value=c[0], scheme_designator=c[1], meaning=c[2])  # noqa: E731
    liver = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Liver", segmented_property_category=code(ANATOMICAL_STRUCTURE),
        segmented_property_type=code(LIVER_CODE), algorithm_type="AUTOMATIC", algorithm_identification=algorithm,
        display_color=hd.color.CIELabColor(54.0, 38.0, 30.0),
    )
    tumour = hd.seg.SegmentDescription(
        segment_number=2, segment_label="Tumour", segmented_property_category=code(MORPHOLOGICALLY_ALTERED),
        segmented_property_type=code(TUMOUR_CODE), algorithm_type="AUTOMATIC", algorithm_identification=algorithm,
        anatomic_regions=[code(LIVER_CODE)], display_color=hd.color.CIELabColor(60.0, 10.0, 70.0),
    )
    return [liver, tumour]
