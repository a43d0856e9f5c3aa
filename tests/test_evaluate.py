"""The evaluation runner and CLI on constructed label maps and a phantom, its error cases, and
the CHAOS sample submission against its published scores."""

import csv
import json
import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from autoliver import examples
from autoliver.cli import main
from autoliver.core.errors import DatasetError
from autoliver.evaluate import CSV_COLUMNS, evaluate_case, evaluate_folders, evaluation_table, read_label_map
from autoliver.evaluate.overlap import case_dice
from autoliver.examples.phantom import make_phantom
from autoliver.io.images import Geometry, write_image

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def geometry(shape, spacing=(2.5, 0.8, 0.8), origin=(-10.0, 5.0, 100.0)):
    return Geometry(shape=tuple(shape), spacing=tuple(spacing), origin=origin, direction=IDENTITY)


def constructed_cases():
    """{case: (reference, prediction, spacing)} covering found, missed, false-positive tumours,
    a case without tumours and a phantom."""
    shape = (16, 40, 40)
    ref = np.zeros(shape, np.uint8)
    ref[2:14, 5:35, 5:35] = 1
    ref[4:8, 10:16, 10:16] = 2
    ref[9:12, 22:30, 22:30] = 2
    pred = np.roll(ref, 1, axis=2)
    pred[9:12, 22:30, 22:31] = 1  # second tumour missed
    pred[3:5, 28:32, 8:12] = 2  # a false positive
    no_tumour = np.zeros(shape, np.uint8)
    no_tumour[3:12, 8:30, 6:33] = 1
    no_tumour_pred = np.roll(no_tumour, -2, axis=1)
    _, phantom = make_phantom((24, 48, 48), (2.5, 1.5, 1.5), np.random.default_rng(3), n_tumours=2, tumour_radius_mm=(4.0, 8.0))
    phantom_pred = ndimage.binary_dilation(phantom > 0).astype(np.uint8)
    phantom_pred[phantom == 2] = 2
    return {
        "case_a": (ref, pred, (2.5, 0.8, 0.8)),
        "case_b": (no_tumour, no_tumour_pred, (2.5, 0.8, 0.8)),
        "phantom": (phantom, phantom_pred, (2.5, 1.5, 1.5)),
    }


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    cases = constructed_cases()
    for case, (ref, pred, spacing) in cases.items():
        write_image(root / "ref" / f"{case}.nii.gz", ref, geometry(ref.shape, spacing))
        write_image(root / "pred" / f"{case}.nii.gz", pred, geometry(ref.shape, spacing))
    (root / "pred" / "case_a.json").write_text("{}")  # predict's reports are ignored
    return root, cases


def _strict_json(path):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_evaluate_folders_writes_csv_and_json(folders, tmp_path):
    root, cases = folders
    result = evaluate_folders(root / "ref", root / "pred", tmp_path / "out", progress=False)
    assert result == _strict_json(tmp_path / "out" / "evaluation.json")
    assert list(result["per_case"]) == sorted(cases)
    inter = {"liver": 0, "tumour": 0}
    volume = {"liver": 0, "tumour": 0}
    errors = []
    for case, (ref, pred, spacing) in cases.items():
        e = result["per_case"][case]
        independent = case_dice(pred, ref)  # the training code's Dice (LiTS rule)
        assert e["liver"]["dice"] == pytest.approx(independent["liver"])
        assert e["tumour"]["dice"] == pytest.approx(independent["tumour"])
        assert e["spacing"] == pytest.approx(list(spacing))  # NIfTI stores float32
        for name, mask in (("liver", lambda a: a > 0), ("tumour", lambda a: a == 2)):
            inter[name] += np.count_nonzero(mask(pred) & mask(ref))
            volume[name] += np.count_nonzero(mask(pred)) + np.count_nonzero(mask(ref))
            assert e[name]["volume_ref_ml"] == pytest.approx(np.count_nonzero(mask(ref)) * np.prod(spacing) / 1000)
        burden_ref = np.count_nonzero(ref == 2) / np.count_nonzero(ref)
        burden_pred = np.count_nonzero(pred == 2) / np.count_nonzero(pred)
        assert e["burden"] == pytest.approx({"ref": burden_ref, "pred": burden_pred})
        errors.append(burden_pred - burden_ref)
    s = result["summary"]
    assert s["n_cases"] == 3
    for name in ("liver", "tumour"):
        assert s[name]["dice_global"] == pytest.approx(2 * inter[name] / volume[name])
        assert s[name]["dice_per_case"] == pytest.approx(np.mean([result["per_case"][c][name]["dice"] for c in cases]))
    assert s["burden"]["rmse"] == pytest.approx(np.sqrt(np.mean(np.square(errors))))
    assert s["burden"]["max_error"] == pytest.approx(np.max(np.abs(errors)))
    # case_a: tumour 1 found (shifted by a column), tumour 2 missed, one false positive
    det = result["per_case"]["case_a"]["detection"]
    assert (det["n_ref"], det["n_pred"], det["tp_overlap"], det["fp_overlap"], det["fn_overlap"]) == (2, 2, 1, 1, 1)
    # case_b has no tumour on either side: Dice 1 (LiTS), surface distances undefined -> null
    b = result["per_case"]["case_b"]["tumour"]
    assert b["dice"] == 1.0 and b["assd_mm"] is None and b["rvd"] is None
    # the mean of the tumour ASSD leaves case_b out
    assert s["tumour"]["assd_mm"] == pytest.approx(np.mean([result["per_case"][c]["tumour"]["assd_mm"] for c in ("case_a", "phantom")]))
    # the phantom's prediction is its liver grown by one voxel: surfaces about one (2.5 mm) step apart
    assert 2.5 <= result["per_case"]["phantom"]["liver"]["mssd_mm"] < 5.0
    assert 0 < result["per_case"]["phantom"]["liver"]["assd_mm"] < 2.5
    assert s["detection"]["overlap"]["tp"] == 1 + 2
    with open(tmp_path / "out" / "evaluation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == CSV_COLUMNS
    assert [r["case"] for r in rows] == sorted(cases)
    assert rows[1]["tumour_assd_mm"] == "" and float(rows[0]["liver_dice"]) == pytest.approx(result["per_case"]["case_a"]["liver"]["dice"], rel=1e-5)
    table = evaluation_table(result)
    assert "case_a" in table and "tumour detection" in table and "global" in table


def test_parallel_matches_serial(folders):
    root, _ = folders
    serial = evaluate_folders(root / "ref", root / "pred", progress=False)
    assert evaluate_folders(root / "ref", root / "pred", n_jobs=2, progress=False) == serial


def test_geometry_mismatch_names_both_files(folders, tmp_path):
    root, cases = folders
    for case, (ref, pred, spacing) in cases.items():
        g = geometry(ref.shape, spacing)
        if case == "case_a":
            g = geometry(ref.shape, (3.0, 0.8, 0.8))
        elif case == "phantom":
            g = geometry(ref.shape, spacing, origin=(0.0, 0.0, 0.0))
        write_image(tmp_path / "pred" / f"{case}.nii.gz", pred, g)
    with pytest.raises(DatasetError) as err:
        evaluate_folders(root / "ref", tmp_path / "pred", progress=False)
    assert len(err.value.problems) == 2
    spacing_problem, origin_problem = err.value.problems
    assert str(tmp_path / "pred" / "case_a.nii.gz") in spacing_problem and str(root / "ref" / "case_a.nii.gz") in spacing_problem
    assert "spacing" in spacing_problem and "origin" in origin_problem and "phantom" in origin_problem


def test_missing_predictions_error_or_empty(folders, tmp_path):
    root, cases = folders
    ref, pred, spacing = cases["case_a"]
    write_image(tmp_path / "pred" / "case_a.nii.gz", pred, geometry(ref.shape, spacing))
    with pytest.raises(DatasetError) as err:
        evaluate_folders(root / "ref", tmp_path / "pred", progress=False)
    text = str(err.value)
    assert "case_b" in text and "phantom" in text and "missing-as-empty" in text
    result = evaluate_folders(root / "ref", tmp_path / "pred", progress=False, missing="empty")
    b = result["per_case"]["case_b"]
    assert b["liver"]["dice"] == 0.0 and b["liver"]["rvd"] == -1.0 and b["prediction_file"] is None
    assert b["liver"]["assd_mm"] is None


def test_bad_label_values_are_an_error(folders, tmp_path):
    root, cases = folders
    for case, (ref, pred, spacing) in cases.items():
        bad = pred.copy()
        if case == "case_b":
            bad[5, 10, 10] = 3
        write_image(tmp_path / "pred" / f"{case}.nii.gz", bad, geometry(ref.shape, spacing))
    with pytest.raises(DatasetError, match=r"case_b\.nii\.gz: label values \[3\]"):
        evaluate_folders(root / "ref", tmp_path / "pred", progress=False)


def test_lits_names_pair_segmentations_with_volume_predictions(tmp_path):
    ref = np.zeros((6, 12, 12), np.uint8)
    ref[1:5, 2:10, 2:10] = 1
    ref[2:4, 4:7, 4:7] = 2
    g = geometry(ref.shape)
    write_image(tmp_path / "lits" / "segmentation-3.nii", ref, g, compress=False)
    write_image(tmp_path / "lits" / "volume-3.nii", (ref * 50).astype(np.int16), g, compress=False)  # the CT: ignored
    write_image(tmp_path / "pred" / "volume-3.nii.gz", ref, g)
    result = evaluate_folders(tmp_path / "lits", tmp_path / "pred", progress=False)
    assert list(result["per_case"]) == ["volume-3"]
    assert result["per_case"]["volume-3"]["reference_file"].endswith("segmentation-3.nii")
    assert result["summary"]["liver"]["dice_global"] == 1.0 and result["summary"]["tumour"]["hd95_mm"] == 0.0


def test_cli_evaluate(folders, tmp_path, capsys):
    root, _ = folders
    out = tmp_path / "cli"
    assert main(["evaluate", "-r", str(root / "ref"), "-p", str(root / "pred"), "-o", str(out), "-np", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "case_a" in printed and "liver: Dice per case" in printed and "evaluation.csv" in printed
    assert (out / "evaluation.csv").is_file() and (out / "evaluation.json").is_file()
    assert main(["evaluate", "-r", str(root / "ref"), "-p", str(tmp_path / "nothing"), "--no-progress"]) == 2


def _chaos_surface_assd(pred, ref, spacing):
    """CHAOS's own definition: erosion with the volume's edge counted as inside (border_value=1)."""
    s = ndimage.generate_binary_structure(3, 1)
    pts = [np.argwhere(m ^ ndimage.binary_erosion(m, s, border_value=1)) * np.asarray(spacing) for m in (pred, ref)]
    d1, d2 = cKDTree(pts[1]).query(pts[0])[0], cKDTree(pts[0]).query(pts[1])[0]
    return (d1.sum() + d2.sum()) / (d1.size + d2.size)


def test_chaos_sample_against_published_scores():
    ref, g = read_label_map(examples.label_path("chaos_ct_sample"))
    pred, g_pred = read_label_map(examples.NIFTI_DIR / "chaos_ct_sample_reference_prediction.nii.gz")
    assert g_pred == g
    liver = evaluate_case(pred, ref, g.spacing)["liver"]
    assert liver["dice"] == pytest.approx(0.978, abs=5e-4)  # published: 0.978
    assert 100 * abs(liver["rvd"]) == pytest.approx(0.665, abs=5e-4)  # published RAVD: 0.665 %
    assert liver["mssd_mm"] == pytest.approx(14.0, abs=1e-6)  # published MSSD: 14 mm
    # published ASSD 0.734 mm: CHAOS does not count voxels on the volume's edge as surface (its
    # liver starts on the first slice); with that definition the same distances give 0.734
    assert liver["assd_mm"] == pytest.approx(0.713, abs=1e-3)
    assert _chaos_surface_assd(pred > 0, ref > 0, g.spacing) == pytest.approx(0.734, abs=5e-4)
    assert not math.isnan(liver["hd95_mm"])


def test_evaluate_case_empty_label_maps():
    empty = np.zeros((4, 5, 6), np.uint8)
    e = evaluate_case(empty, empty, (1.0, 1.0, 1.0))
    assert e["liver"]["dice"] == e["tumour"]["dice"] == 1.0 and e["liver"]["accuracy"] == 1.0
    assert math.isnan(e["liver"]["assd_mm"]) and e["burden"] == {"ref": 0.0, "pred": 0.0}
    ref = empty.copy()
    ref[1:3, 1:3, 1:3] = 2
    e = evaluate_case(empty, ref, (2.0, 1.0, 1.0))
    assert e["liver"]["dice"] == 0.0 and e["liver"]["rvd"] == -1.0 and e["liver"]["volume_ref_ml"] == pytest.approx(0.016)
    assert e["detection"]["fn_iou50"] == 1 and e["burden"] == {"ref": 1.0, "pred": 0.0}
    with pytest.raises(ValueError):
        evaluate_case(empty, ref[:2], (1.0, 1.0, 1.0))
