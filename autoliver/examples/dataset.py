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
from autoliver.io.atomic import write_json
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
    ``autoliver.phantom.make_phantom`` from a generator seeded with (seed, k). The dataset is
    built in a temporary sibling folder and renamed, so an interrupted build leaves nothing.
    """
    from autoliver.phantom import make_phantom

    root = Path(root)
    if root.exists():
        if not overwrite:
            raise FileExistsError(f"{root}: already exists; remove it or pass overwrite=True (--overwrite)")
    tmp_root = root.with_name(f".{root.name}.building")
    shutil.rmtree(tmp_root, ignore_errors=True)
    (tmp_root / "imagesTr").mkdir(parents=True)
    (tmp_root / "labelsTr").mkdir()
    try:
        for case in real_cases:
            shutil.copyfile(image_path(case), tmp_root / "imagesTr" / f"{case}_0000.nii.gz")
            shutil.copyfile(label_path(case), tmp_root / "labelsTr" / f"{case}.nii.gz")
        for k in range(n_phantoms):
            rng = np.random.default_rng([seed, k])
            image, label = make_phantom(phantom_shape, phantom_spacing, rng)
            geometry = Geometry(tuple(image.shape), tuple(float(s) for s in phantom_spacing), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
            write_image(tmp_root / "imagesTr" / f"phantom_{k:03d}_0000.nii.gz", image, geometry)
            write_image(tmp_root / "labelsTr" / f"phantom_{k:03d}.nii.gz", label.astype(np.uint8), geometry)
        description = f"{len(real_cases)} real CT cases shipped with autoliver (see autoliver/examples/README.md) and {n_phantoms} synthetic phantoms"
        write_json(tmp_root / "dataset.json", dataset_json(len(real_cases) + n_phantoms, description))
        if root.exists():
            shutil.rmtree(root)
        tmp_root.rename(root)
    except BaseException:
        shutil.rmtree(tmp_root, ignore_errors=True)
        raise
    log.info("wrote example dataset %s (%d real cases, %d phantoms)", root, len(real_cases), n_phantoms)
    return root
