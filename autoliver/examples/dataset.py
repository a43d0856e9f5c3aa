"""Build a raw dataset (nnU-Net v2 layout) from the shipped real cases plus synthetic phantoms.

Used by the README's quick start, the tests and the benchmarks, so that all of them run on the
same real data without anything outside the repository.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from autoliver.examples import image_path, label_path
from autoliver.io.atomic import atomic_dir, write_json
from autoliver.io.images import Geometry, write_image

log = logging.getLogger(__name__)

# every labelled real case except totalseg_example_ct_sm, a crop of totalseg_example_ct_full:
# the two must never sit on opposite sides of a train/validation split
DEFAULT_REAL_CASES = (
    "lits117_128cube",
    "chaos_ct_sample",
    "totalseg_example_ct_full",
    "totalseg_example_dicom20",
    "dcmqi_ct3slice",
)
LABELS = {"background": 0, "liver": 1, "tumour": 2}


def dataset_json(n_training: int, description: str = "") -> dict:
    return {
        "channel_names": {"0": "CT"},
        "labels": dict(LABELS),
        "numTraining": n_training,
        "file_ending": ".nii.gz",
        "description": description,
    }


def phantom_geometry(shape, spacing) -> Geometry:
    """Axis-aligned geometry at the origin for a phantom of ``shape`` (z, y, x) and ``spacing`` mm."""
    return Geometry(tuple(int(s) for s in shape), tuple(float(s) for s in spacing), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def write_phantom_case(images_dir: Path, labels_dir: Path, case_id: str, shape, spacing, rng: np.random.Generator, **kwargs) -> None:
    """Write ``<case_id>_0000.nii.gz`` and ``<case_id>.nii.gz`` of one ``make_phantom`` phantom."""
    from autoliver.examples.phantom import make_phantom

    image, label = make_phantom(tuple(shape), tuple(spacing), rng, **kwargs)
    geometry = phantom_geometry(image.shape, spacing)
    write_image(Path(images_dir) / f"{case_id}_0000.nii.gz", image, geometry)
    write_image(Path(labels_dir) / f"{case_id}.nii.gz", label.astype(np.uint8), geometry)


def build_example_dataset(
    root: Path,
    real_cases: tuple[str, ...] = DEFAULT_REAL_CASES,
    n_phantoms: int = 0,
    phantom_shape: tuple[int, int, int] = (96, 160, 160),
    phantom_spacing: tuple[float, float, float] = (2.5, 1.6, 1.6),
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write ``root`` (a folder named DatasetNNN_Name) and return it.

    Real cases are copied byte for byte; phantom ``k`` is ``phantom_{k:03d}`` made with
    ``autoliver.examples.phantom.make_phantom`` from a generator seeded with (seed, k). The dataset is
    built in a temporary sibling folder and renamed, so an interrupted build leaves nothing.
    """
    root = Path(root)
    if root.exists():
        if not overwrite:
            raise FileExistsError(f"{root}: already exists; remove it or pass overwrite=True (--overwrite)")
    with atomic_dir(root) as tmp_root:
        (tmp_root / "imagesTr").mkdir()
        (tmp_root / "labelsTr").mkdir()
        for case in real_cases:
            shutil.copyfile(image_path(case), tmp_root / "imagesTr" / f"{case}_0000.nii.gz")
            shutil.copyfile(label_path(case), tmp_root / "labelsTr" / f"{case}.nii.gz")
        for k in range(n_phantoms):
            write_phantom_case(tmp_root / "imagesTr", tmp_root / "labelsTr", f"phantom_{k:03d}", phantom_shape, phantom_spacing,
                               np.random.default_rng([seed, k]))
        description = f"{len(real_cases)} real CT cases shipped with autoliver (see autoliver/examples/README.md) and {n_phantoms} synthetic phantoms"
        write_json(tmp_root / "dataset.json", dataset_json(len(real_cases) + n_phantoms, description))
    log.info("wrote example dataset %s (%d real cases, %d phantoms)", root, len(real_cases), n_phantoms)
    return root
