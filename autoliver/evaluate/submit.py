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
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

from autoliver.core.errors import DatasetError, ImageReadError, UsageError
from autoliver.core.labels import label_value_problems
from autoliver.io.atomic import atomic_path
from autoliver.io.images import Geometry, image_suffix, read_header, read_image, write_image
from autoliver.io.validate import Tolerances, geometry_mismatch

log = logging.getLogger(__name__)

LITS_TEST_CASES = 70
UINT8 = "8-bit unsigned integer"
SUBMISSION_RE = re.compile(r"^test-segmentation-(?P<n>\d+)\.nii$")
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
    problems = []
    if check_dtype and pixel_type != UINT8:
        problems.append(f"{shown}: stored as {pixel_type}; LiTS expects {UINT8} (uint8) labels: rebuild it with autoliver submit")
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


def _members(path: Path) -> list[str]:
    if path.is_dir():
        return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    with zipfile.ZipFile(path) as zf:
        return sorted(name for name in zf.namelist() if not name.endswith("/"))


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
    problems: list[str] = []
    present: dict[int, str] = {}
    for name in _members(path):
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
        zf = zipfile.ZipFile(path) if path.is_file() else None
        try:
            for n in tqdm(sorted(present), desc="check", unit="case", disable=not progress):
                shown = path / present[n]
                if zf is None:
                    local = shown
                else:
                    local = Path(tmp) / submission_name(n)
                    with zf.open(present[n]) as src, open(local, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                volume = None if volumes is None or n not in volumes else volumes[n]
                problems += _case_problems(local, shown, volume, tolerances)[0]
                if zf is not None:
                    local.unlink()
        finally:
            if zf is not None:
                zf.close()
    return problems
