"""LiTS submissions: built from predict-style outputs of a tiny fake LiTS test folder, then
checked; broken submissions list every problem."""

import zipfile

import numpy as np
import pytest

from autoliver.cli import main
from autoliver.core.errors import DatasetError
from autoliver.evaluate.submit import build_submission, check_submission
from autoliver.io.images import Geometry, read_image, write_image

FLIP_X = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
VOLUMES = {
    0: Geometry(shape=(5, 16, 14), spacing=(2.5, 0.7, 0.7), origin=(10.0, -20.0, 300.0), direction=FLIP_X),
    1: Geometry(shape=(7, 12, 12), spacing=(1.0, 0.9, 0.9), origin=(0.0, 0.0, 0.0), direction=FLIP_X),
    2: Geometry(shape=(4, 10, 10), spacing=(3.0, 0.8, 0.8), origin=(-5.0, 5.0, 50.0), direction=FLIP_X),
}


def labels_for(g: Geometry, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    seg = np.zeros(g.shape, np.uint8)
    seg[1:-1, 2:-2, 2:-2] = 1
    seg[2, 4:7, 4:7] = 2
    seg[rng.random(g.shape) < 0.05] = 0
    return seg


@pytest.fixture()
def lits(tmp_path):
    """A fake LiTS test folder (test-volume-N.nii) and predict-style outputs (test-volume-N.nii.gz + .json)."""
    test_dir, pred_dir = tmp_path / "LiTS_test", tmp_path / "predictions"
    for n, g in VOLUMES.items():
        write_image(test_dir / f"test-volume-{n}.nii", np.full(g.shape, -100, np.int16), g, compress=False)
        write_image(pred_dir / f"test-volume-{n}.nii.gz", labels_for(g, n), g)
        (pred_dir / f"test-volume-{n}.json").write_text("{}")
    return test_dir, pred_dir


def test_build_then_check_passes(lits, tmp_path):
    test_dir, pred_dir = lits
    out = build_submission(pred_dir, tmp_path / "sub" / "submission.zip", test_dir, progress=False)
    with zipfile.ZipFile(out) as zf:
        assert sorted(zf.namelist()) == [f"test-segmentation-{n}.nii" for n in VOLUMES]
        zf.extractall(tmp_path / "unzipped")
    for n, g in VOLUMES.items():
        seg, geom = read_image(tmp_path / "unzipped" / f"test-segmentation-{n}.nii")
        assert seg.dtype == np.uint8 and np.array_equal(seg, labels_for(g, n))
        assert geom.shape == g.shape and np.allclose(geom.spacing, g.spacing) and np.allclose(geom.origin, g.origin)
        assert np.allclose(geom.direction, g.direction)
    assert check_submission(out, test_dir, progress=False) == []
    assert check_submission(tmp_path / "unzipped", test_dir, progress=False) == []  # a folder works too
    assert check_submission(out, n_cases=3, progress=False) == []
    default = check_submission(out, progress=False)  # the full LiTS test set has 70 volumes
    assert len(default) == 67 and all("missing" in p for p in default)
    with pytest.raises(FileExistsError):
        build_submission(pred_dir, out, test_dir, progress=False)


def test_cli_predict_output_to_submission(lits, tmp_path, capsys):
    test_dir, pred_dir = lits
    # a float prediction (e.g. from another tool) is converted to uint8 when building
    g = VOLUMES[1]
    write_image(pred_dir / "test-volume-1.nii.gz", labels_for(g, 1).astype(np.float32), g)
    out = tmp_path / "submission.zip"
    assert main(["submit", "-i", str(pred_dir), "-o", str(out), "-t", str(test_dir), "--no-progress"]) == 0
    assert main(["submit", "--check", "-i", str(out), "-t", str(test_dir), "--no-progress"]) == 0
    assert "valid LiTS submission" in capsys.readouterr().out
    assert main(["submit", "--check", "-i", str(out), "--no-progress"]) == 1  # 67 of the 70 LiTS cases missing


def test_converted_dataset_names_are_accepted(lits, tmp_path):
    test_dir, pred_dir = lits
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for n in VOLUMES:
        (pred_dir / f"test-volume-{n}.nii.gz").rename(renamed / f"liver_test_{n}.nii.gz")
    out = build_submission(renamed, tmp_path / "s.zip", test_dir, progress=False)
    assert check_submission(out, test_dir, progress=False) == []


def _broken_zip(tmp_path, test_dir) -> tuple:
    """A submission with one problem of each kind; returns (zip path, expected problem fragments)."""
    folder = tmp_path / "broken"
    g0, g1 = VOLUMES[0], VOLUMES[1]
    bad = labels_for(g0, 0).astype(np.float32)
    bad[2, 2, 2] = 3
    write_image(folder / "test-segmentation-0.nii", bad, g0, compress=False)  # float + label 3
    wrong_shape = Geometry(shape=(7, 12, 11), spacing=g1.spacing, origin=g1.origin, direction=g1.direction)
    write_image(folder / "test-segmentation-1.nii", np.zeros(wrong_shape.shape, np.uint8), wrong_shape, compress=False)
    g2 = VOLUMES[2]
    wrong_spacing = Geometry(shape=g2.shape, spacing=(2.0, 0.8, 0.8), origin=g2.origin, direction=g2.direction)
    write_image(folder / "test-segmentation-2.nii.gz", labels_for(g2, 2), g2)  # compressed: wrong name
    write_image(folder / "test-segmentation-9.nii", labels_for(g2, 2), wrong_spacing, compress=False)  # no such volume
    write_image(folder / "seg-2.nii", labels_for(g2, 2), wrong_spacing, compress=False)  # wrong name
    zpath = tmp_path / "broken.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, arcname=f.name)
        zf.write(folder / "test-segmentation-0.nii", arcname="sub/test-segmentation-0.nii")  # inside a folder
    expected = [
        ("test-segmentation-0.nii", "32-bit float"),
        ("test-segmentation-0.nii", "label values [3"),
        ("test-segmentation-1.nii", "shape (7, 12, 11)"),
        ("test-segmentation-2.nii.gz", "uncompressed"),
        ("test-segmentation-2.nii missing", "test-volume-2.nii"),
        ("test-segmentation-9.nii has no test volume", ""),
        ("seg-2.nii", "unexpected file"),
        ("sub/test-segmentation-0.nii", "inside a folder"),
    ]
    return zpath, expected


def test_check_lists_every_problem(lits, tmp_path, capsys):
    test_dir, _ = lits
    zpath, expected = _broken_zip(tmp_path, test_dir)
    problems = check_submission(zpath, test_dir, progress=False)
    for name, fragment in expected:
        assert any(name in p and fragment in p for p in problems), (name, fragment, problems)
    assert len(problems) == len(expected)
    # a wrong spacing is found too
    g2 = VOLUMES[2]
    write_image(tmp_path / "sp" / "test-segmentation-2.nii", labels_for(g2, 2),
                Geometry(shape=g2.shape, spacing=(2.0, 0.8, 0.8), origin=g2.origin, direction=g2.direction), compress=False)
    spacing_problems = [p for p in check_submission(tmp_path / "sp", test_dir, progress=False) if "spacing" in p]
    assert len(spacing_problems) == 1 and "test-volume-2.nii" in spacing_problems[0]
    assert main(["submit", "--check", "-i", str(zpath), "-t", str(test_dir), "--no-progress"]) == 1
    printed = capsys.readouterr().out
    assert f"{len(expected)} problem(s)" in printed and "label values [3" in printed
    assert check_submission(test_dir / "test-volume-0.nii", progress=False)[0].endswith("a zip of test-segmentation-N.nii files")


def test_build_refuses_broken_predictions(lits, tmp_path):
    test_dir, pred_dir = lits
    g = VOLUMES[0]
    bad = labels_for(g, 0)
    bad[0, 0, 0] = 7
    write_image(pred_dir / "test-volume-0.nii.gz", bad, g)
    (pred_dir / "test-volume-2.nii.gz").unlink()
    wrong = Geometry(shape=VOLUMES[1].shape, spacing=VOLUMES[1].spacing, origin=(1.0, 0.0, 0.0), direction=FLIP_X)
    write_image(pred_dir / "test-volume-1.nii.gz", labels_for(VOLUMES[1], 1), wrong)
    out = tmp_path / "submission.zip"
    with pytest.raises(DatasetError) as err:
        build_submission(pred_dir, out, test_dir, progress=False)
    text = str(err.value)
    assert "label values [7]" in text and "origin" in text and "test-segmentation-2.nii missing" in text
    assert not out.exists() and list(tmp_path.glob(".*")) == []
