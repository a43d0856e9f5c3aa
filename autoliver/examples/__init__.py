"""Real CT example cases shipped with autoliver (see README.md in this folder for sources,
licences and quirks)."""

from __future__ import annotations

from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parent
NIFTI_DIR = EXAMPLES_DIR / "nifti"
DICOM_DIR = EXAMPLES_DIR / "dicom"

CASES = (
    "lits117_128cube",
    "chaos_ct_sample",
    "totalseg_example_ct_full",
    "totalseg_example_ct_sm",
    "totalseg_example_dicom20",
    "dcmqi_ct3slice",
)


def image_path(case: str) -> Path:
    return NIFTI_DIR / f"{case}_image.nii.gz"


def label_path(case: str) -> Path:
    return NIFTI_DIR / f"{case}_label.nii.gz"
