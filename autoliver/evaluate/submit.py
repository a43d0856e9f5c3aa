"""LiTS leaderboard submissions: build one from predictions, and check one.

The format: a zip holding, at its root, ``test-segmentation-N.nii`` (uncompressed NIfTI, uint8
labels 0 background, 1 liver, 2 tumour) for every test volume ``test-volume-N.nii``, each in its
volume's exact geometry (shape, spacing, origin, direction). The LiTS test set has 70 volumes
(N = 0..69).

Predictions are found by case id: ``autoliver predict`` on the LiTS test folder names the case
of ``test-volume-N.nii`` ``test-volume-N``; on a converted dataset's imagesTs it is
``liver_test_N``; ``test-segmentation-N`` is taken as it is. Other images in the folder are
ignored (logged). The same names (with an optional ``_0000``) find the test volumes.

Building checks everything ``check_submission`` checks, before the zip exists: a problem in
any case stops the build with every problem listed, and nothing is written. With the test
volumes given, each segmentation is written with its volume's geometry as read from the
volume's header (after checking that they agree within the validation tolerances).

Checking a zip reads it with ``autoliver.io.archive`` (escaping paths, links, duplicates and
damaged members are refused or reported, never a traceback) and extracts one member at a time.
A member whose declared size is far beyond what a uint8 segmentation of its volume can be (a
zip bomb) is reported without being inflated, and one that inflates past its declared size is
stopped there. The stored voxel type is read from the raw NIfTI header: LiTS wants uint8
labels, so a float32 file is invalid even when its values are 0/1/2, as is one that stores a
scaling (``scl_slope``/``scl_inter``) or NaN/Inf voxels (which ITK reads as 0).
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from autoliver.core.errors import DatasetError, ImageReadError, UsageError
from autoliver.core.labels import label_value_problems
from autoliver.io.archive import ArchiveError, ArchiveLimits, ArchiveMember, GiB, MiB, iter_member, open_checked
from autoliver.io.atomic import atomic_path
from autoliver.io.images import Geometry, image_suffix, read_header, read_image, write_image
from autoliver.io.nifti_raw import check_nifti_header, nifti_nonfinite_count
from autoliver.io.validate import Tolerances, geometry_mismatch

log = logging.getLogger(__name__)

LITS_TEST_CASES = 70
UINT8 = "8-bit unsigned integer"
SUBMISSION_RE = re.compile(r"^test-segmentation-(?P<n>\d+)\.nii$")
NIFTI_HEADER_BYTES = 352  # a single-file NIfTI-1 header and its extension flag
MAX_SEGMENTATION_BYTES = 512 * 512 * 2048 + MiB  # a uint8 volume of 512 x 512 x 2048 voxels and a header (LiTS test volumes have at most ~1000 slices)
WIDEST_VOXEL = 8  # float64: a segmentation stored as a wider type is still read, to report its type
# label maps compress a thousandfold when empty, so no ratio bound; sizes are bounded per case instead
SUBMISSION_LIMITS = ArchiveLimits(max_total_bytes=LITS_TEST_CASES * 4 * GiB, max_member_bytes=4 * GiB, max_members=1000, max_ratio=None)
_CASE_RE = re.compile(r"^(?:test-volume-|test-segmentation-|liver_test_)(?P<n>\d+)(?:_0000)?$")


def submission_name(n: int) -> str:
    return f"test-segmentation-{n}.nii"


def lits_test_cases(folder: str | Path, what: str = "prediction") -> tuple[dict[int, Path], list[str]]:
    """({N: file}, problems) of the LiTS test case images in ``folder`` (see the module docstring)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder; give the folder holding the {what}s")
    found: dict[int, Path] = {}
    problems, ignored = [], []
    for path in sorted(folder.iterdir()):
        suffix = image_suffix(path)
        if suffix is None or path.name.startswith(".") or not path.is_file():
            continue
        m = _CASE_RE.match(path.name[: -len(suffix)])
        if m is None:
            ignored.append(path.name)
            continue
        n = int(m["n"])
        if n in found:
            problems.append(f"{path}: test case {n} given twice ({found[n].name} and {path.name}); keep one")
            continue
        found[n] = path
    if ignored:
        log.warning("%s: %d image(s) not named as a LiTS test case ignored: %s", folder, len(ignored), ", ".join(ignored[:5]))
    return found, problems


def _volume_geometries(test_dir: Path | None) -> dict[int, tuple[Path, Geometry | None]] | None:
    if test_dir is None:
        return None
    volumes, problems = lits_test_cases(test_dir, "test volume")
    if problems:
        raise DatasetError(problems)
    if not volumes:
        raise DatasetError(f"{test_dir}: no LiTS test volumes (test-volume-N.nii) found; give the LiTS test folder")
    return {n: (p, read_header(p)[0]) for n, p in volumes.items()}


def _case_problems(path: Path, shown: Path, volume: tuple[Path, Geometry | None] | None, tol: Tolerances,
                   check_dtype: bool = True):
    """(problems, array or None, geometry or None) of one segmentation file; ``shown`` names it.
    ``check_dtype``: a stored type other than uint8 is a problem (building converts it instead)."""
    try:
        geometry, dim, pixel_type = read_header(path)
    except ImageReadError as exc:
        return [str(exc).replace(str(path), str(shown))], None, None
    if dim != 3 or geometry is None:
        return [f"{shown}: is a {dim}D image; a segmentation must be one 3D volume"], None, None
    problems = _stored_type_problems(path, shown, pixel_type, check_dtype)
    if volume is not None:
        vol_path, vol_geom = volume
        if vol_geom is None:
            problems.append(f"{vol_path}: not a 3D volume; cannot check {shown} against it")
        else:
            problems += geometry_mismatch(vol_path, vol_geom, shown, geometry, tol)
    try:
        array, geometry = read_image(path)
    except ImageReadError as exc:
        return problems + [str(exc).replace(str(path), str(shown))], None, None
    problems += label_value_problems(shown, array)
    return problems, array, geometry


def _stored_type_problems(path: Path, shown: Path, pixel_type: str, check_dtype: bool = True) -> list[str]:
    """The stored voxels (from the raw NIfTI header when it is one): NaN/Inf are always a problem;
    with ``check_dtype`` also a type other than uint8, or a value scaling."""
    fix = "rebuild it with autoliver submit"
    try:
        header = check_nifti_header(path)
        nonfinite = nifti_nonfinite_count(path) if header is not None else None
    except ImageReadError as exc:
        return [str(exc).replace(str(path), str(shown))]
    problems = []
    if check_dtype and header is None and pixel_type != UINT8:
        problems.append(f"{shown}: stored as {pixel_type}; LiTS expects {UINT8} (uint8) labels: {fix}")
    if check_dtype and header is not None:
        if header.dtype.kind != "u" or header.dtype.itemsize != 1:
            problems.append(f"{shown}: stored as {pixel_type} ({header.dtype.name} in the NIfTI header); LiTS expects {UINT8} (uint8) labels: {fix}")
        slope, inter = (float(header.header["scl_slope"]), float(header.header["scl_inter"]))
        if (math.isfinite(slope) and slope not in (0.0, 1.0)) or (math.isfinite(inter) and inter != 0.0):  # NaN or 0: no scaling
            problems.append(f"{shown}: stores a value scaling (scl_slope {slope:g}, scl_inter {inter:g}), so readers see scaled floats, "
                            f"not labels; write plain uint8 labels: {fix}")
    if nonfinite:
        problems.append(f"{shown}: holds {nonfinite} NaN/Inf voxels (read as 0 by ITK); labels must be integers 0, 1, 2: fix the prediction")
    return problems


def _size_problem(member: ArchiveMember, shown: Path, volume: tuple[Path, Geometry | None] | None) -> str | None:
    """A member whose declared size no segmentation of its volume can have: reported, not inflated."""
    geometry = None if volume is None else volume[1]
    if geometry is None:
        limit, what = MAX_SEGMENTATION_BYTES, f"{MAX_SEGMENTATION_BYTES // MiB} MiB, the most a uint8 segmentation of up to 512 x 512 x 2048 voxels takes"
    else:
        n_voxels = int(np.prod(geometry.shape))
        limit = WIDEST_VOXEL * (NIFTI_HEADER_BYTES + n_voxels) + MiB
        what = f"{limit} bytes (a uint8 segmentation of {volume[0].name}, shape {geometry.shape}, is {NIFTI_HEADER_BYTES + n_voxels} bytes)"
    if member.size <= limit:
        return None
    return (f"{shown}: declares {member.size} bytes unpacked ({member.compressed_size} compressed), more than {what}; "
            "not extracted (a zip bomb, or not a uint8 segmentation of this volume)")


def _missing_and_extra(present: set[int], expected: set[int], where: Path, volumes) -> list[str]:
    problems = [f"{where}: {submission_name(n)} missing" + (f" (test volume {volumes[n][0]})" if volumes else "") for n in sorted(expected - present)]
    problems += [f"{where}: {submission_name(n)} has no test volume" + (" in the test folder" if volumes else f" (the LiTS test set is test-volume-0..{len(expected) - 1})")
                 for n in sorted(present - expected)]
    return problems


def build_submission(prediction_dir: str | Path, output: str | Path, test_dir: str | Path | None = None,
                     overwrite: bool = False, progress: bool = True, tolerances: Tolerances = Tolerances()) -> Path:
    """Write the LiTS submission zip ``output`` from ``prediction_dir``; return its path.

    Every case expected (the test volumes of ``test_dir`` when given, else the predictions
    found) must be present and valid; otherwise one DatasetError lists every problem and nothing
    is written."""
    prediction_dir, output = Path(prediction_dir).expanduser(), Path(output).expanduser()
    if output.suffix.lower() != ".zip":
        raise UsageError(f"{output}: the submission must be a .zip file")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output}: exists; remove it or pass --overwrite")
    predictions, problems = lits_test_cases(prediction_dir)
    volumes = _volume_geometries(Path(test_dir).expanduser() if test_dir is not None else None)
    expected = set(volumes) if volumes is not None else set(predictions)
    if not predictions:
        raise DatasetError(f"{prediction_dir}: no predictions of LiTS test volumes (test-volume-N.nii.gz) found; run autoliver predict on the LiTS test folder first")
    problems += _missing_and_extra(set(predictions), expected, prediction_dir, volumes)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".autoliver-submit-", dir=output.parent) as tmp, \
            atomic_path(output, suffix=".zip") as tmp_zip:
        with zipfile.ZipFile(tmp_zip, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for n in tqdm(sorted(set(predictions) & expected), desc="submit", unit="case", disable=not progress):
                path = predictions[n]
                volume = None if volumes is None else volumes[n]
                case_problems, array, geometry = _case_problems(path, path, volume, tolerances, check_dtype=False)
                problems += case_problems
                if case_problems or problems:
                    continue
                if volume is not None:
                    geometry = volume[1]
                target = Path(tmp) / submission_name(n)
                write_image(target, array.astype("uint8"), geometry, compress=False)
                zf.write(target, arcname=submission_name(n))
                target.unlink()
        if problems:
            raise DatasetError(problems + [f"nothing written to {output}"])
    log.info("wrote %s (%d cases)", output, len(expected))
    return output


def _members(path: Path) -> dict[str, ArchiveMember | None]:
    """File name -> its zip member (None in a folder); ArchiveError for a refused zip."""
    if path.is_dir():
        return {str(p.relative_to(path)): None for p in sorted(path.rglob("*")) if p.is_file()}
    return {m.name: m for m in sorted(open_checked(path, SUBMISSION_LIMITS), key=lambda m: m.name) if not m.is_dir}


def _unzipped(path: Path, member: ArchiveMember, local: Path) -> Path:
    with open(local, "wb") as dst:
        for data in iter_member(path, member):
            dst.write(data)
    return local


def check_submission(path: str | Path, test_dir: str | Path | None = None, n_cases: int | None = None,
                     progress: bool = True, tolerances: Tolerances = Tolerances()) -> list[str]:
    """Every problem of a submission zip or folder (empty list: valid).

    Expected cases: the test volumes of ``test_dir`` (whose geometry each segmentation must
    match), else N = 0 .. ``n_cases`` - 1 (default: the 70 LiTS test volumes)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; give the submission zip or folder")
    if path.is_file() and not zipfile.is_zipfile(path):
        return [f"{path}: not a zip file; a LiTS submission is a zip of test-segmentation-N.nii files"]
    volumes = _volume_geometries(Path(test_dir).expanduser() if test_dir is not None else None)
    expected = set(volumes) if volumes is not None else set(range(LITS_TEST_CASES if n_cases is None else n_cases))
    try:
        members = _members(path)
    except ArchiveError as exc:
        return exc.problems
    problems: list[str] = []
    present: dict[int, str] = {}
    for name in members:
        m = SUBMISSION_RE.match(Path(name).name)
        if m and "/" in name:
            problems.append(f"{path / name}: inside a folder; put the file at the {'zip' if path.is_file() else 'folder'}'s root")
        elif m is None:
            hint = ("compressed NIfTI: LiTS expects uncompressed .nii" if name.endswith(".nii.gz")
                    else "submission files must be named test-segmentation-N.nii")
            problems.append(f"{path / name}: unexpected file ({hint})")
        else:
            present[int(m["n"])] = name
    problems += _missing_and_extra(set(present), expected, path, volumes)
    with tempfile.TemporaryDirectory(prefix=".autoliver-check-") as tmp:
        for n in tqdm(sorted(present), desc="check", unit="case", disable=not progress):
            shown, member = path / present[n], members[present[n]]
            volume = None if volumes is None or n not in volumes else volumes[n]
            local = shown
            if member is not None:
                too_large = _size_problem(member, shown, volume)
                if too_large is not None:
                    problems.append(too_large)
                    continue
                try:
                    local = _unzipped(path, member, Path(tmp) / submission_name(n))
                except ArchiveError as exc:
                    problems += exc.problems
                    continue
            problems += _case_problems(local, shown, volume, tolerances)[0]
            if member is not None:
                local.unlink()
    return problems
