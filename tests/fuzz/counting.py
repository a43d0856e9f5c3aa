"""How many generated cases each kind of fuzz test ran (reported in the terminal summary)."""

from __future__ import annotations

from collections import Counter

COUNTS: Counter[str] = Counter()

KINDS = ("nifti", "nrrd", "mha", "dicom", "json")  # test_total runs last (file order) and needs every kind


def count(kind: str) -> None:
    COUNTS[kind] += 1
