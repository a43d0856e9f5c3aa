"""`autoliver predict` end to end with tiny random-weight models (the ``model_ws`` fixture: a
copy per test of a model folder written as training writes it, without training): every input
kind (NIfTI file, `_0000` folder, DICOM series, oblique anisotropic MHA) keeps its exact
geometry; skip/overwrite, a corrupt input among good ones, shards, TTA on and off."""

import gzip
import json
import logging
import math
import struct

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import DATASET

from autoliver import examples
from autoliver.cli import main
from autoliver.core.errors import MissingArtefactError
from autoliver.infer.pipeline import predict_case
from autoliver.infer.predictor import load_model, mirrored
from autoliver.io.images import Geometry, read_image, write_image
from autoliver.io.inputs import discover_inputs, parse_shard, select_shard

FAST = ["--no-progress", "--threads", "1", "--device", "cpu"]

pytestmark = pytest.mark.usefixtures("single_thread")


def predict(ws, inp, out, *extra):
    if "-c" not in extra:
        extra = ("-c", "2d", "-f", "0", *extra)
    return main(["predict", "-i", str(inp), "-o", str(out), "-d", DATASET, "--workspace", str(ws.root), *FAST, *extra])


def assert_same_geometry(seg_path, reference: Geometry, direction_tol=1e-9):
    img = sitk.ReadImage(str(seg_path))
    assert img.GetPixelID() == sitk.sitkUInt8
    got = Geometry.of(img)
    assert got.shape == reference.shape
    assert got.spacing == pytest.approx(reference.spacing, abs=1e-6)
    assert got.origin == pytest.approx(reference.origin, abs=1e-6)
    assert got.direction == pytest.approx(reference.direction, abs=direction_tol)
    assert set(np.unique(sitk.GetArrayViewFromImage(img))) <= {0, 1, 2}


def phantom_images(ws):
    return sorted((ws.raw / DATASET / "imagesTr").glob("*_0000.nii.gz"))


def test_nifti_file_and_report(model_ws, tmp_path):
    src = examples.image_path("lits117_128cube")
    assert predict(model_ws, src, tmp_path, "--save-probabilities") == 0
    case = "lits117_128cube_image"
    _, geom = read_image(src)
    assert_same_geometry(tmp_path / f"{case}.nii.gz", geom)
    rep = json.loads((tmp_path / f"{case}.json").read_text())
    assert rep["configuration"] == "2d" and rep["folds"] == ["0"] and rep["autoliver_version"]
    assert {"read_s", "preprocess_s", "network_s", "export_s"} <= set(rep["runtime_s"])
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{case}.nii.gz")))
    assert rep["liver_volume_ml"] == pytest.approx(np.count_nonzero(seg) * 1e-3)  # 1 mm iso
    assert rep["tumour_count"] == len(rep["tumours"])
    probs = np.load(tmp_path / f"{case}.npz")["probabilities"]
    assert probs.dtype == np.float16 and probs.shape == (3, *geom.shape)
    assert np.allclose(probs.astype(np.float32).sum(0), 1.0, atol=1e-2)


def test_folder_with_0000_naming_skip_overwrite_and_tta(model_ws, tmp_path, caplog):
    images = phantom_images(model_ws)
    out = tmp_path / "out"
    assert predict(model_ws, images[0].parent, out, "--no-tta") == 0
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in images)
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{c}.nii.gz" for c in cases]
    for img, case in zip(images, cases):
        _, geom = read_image(img)
        assert_same_geometry(out / f"{case}.nii.gz", geom)
    first = out / f"{cases[0]}.nii.gz"
    stamp = first.stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        assert predict(model_ws, images[0].parent, out) == 0
    assert first.stat().st_mtime_ns == stamp and "already predicted" in caplog.text
    assert predict(model_ws, images[0], out, "--overwrite", "--tta") == 0  # TTA on, one file
    assert first.stat().st_mtime_ns != stamp
    assert json.loads((out / f"{cases[0]}.json").read_text())["tta"] is True


def test_dicom_series_keep_the_dicom_geometry(model_ws, tmp_path):
    one = examples.DICOM_DIR / "dcmqi_ct3slice"
    assert predict(model_ws, one, tmp_path / "single", "--no-tta") == 0  # one series folder
    assert_same_geometry(tmp_path / "single" / "dcmqi_ct3slice.nii.gz", read_image(one)[1])
    # a folder of series folders (the DICOM-SEG file loose next to them is ignored)
    assert predict(model_ws, examples.DICOM_DIR, tmp_path / "many", "--no-tta") == 0
    assert sorted(p.name for p in (tmp_path / "many").glob("*.nii.gz")) == ["dcmqi_ct3slice.nii.gz", "totalseg_example_dicom20.nii.gz"]
    geom = read_image(examples.DICOM_DIR / "totalseg_example_dicom20")[1]
    assert geom.shape == (20, 512, 512)
    assert_same_geometry(tmp_path / "many" / "totalseg_example_dicom20.nii.gz", geom)


def test_oblique_anisotropic_mha(model_ws, tmp_path):
    image, _ = read_image(phantom_images(model_ws)[0])
    a = math.radians(25)
    direction = (math.cos(a), 0.0, math.sin(a), 0.0, 1.0, 0.0, -math.sin(a), 0.0, math.cos(a))
    geom = Geometry(image.shape, (9.5, 6.3, 7.1), (-120.5, 33.25, 401.0), direction)
    src = tmp_path / "in" / "oblique.mha"
    write_image(src, image, geom)
    assert predict(model_ws, src, tmp_path / "out", "--no-tta") == 0
    assert_same_geometry(tmp_path / "out" / "oblique.nii.gz", geom, direction_tol=1e-7)
    # exactly the geometry the input itself has once written as NIfTI (whose header stores the
    # direction as a float32 quaternion: about 1e-8 off the MHA's double-precision matrix)
    write_image(tmp_path / "as_nifti.nii.gz", image, geom)
    assert Geometry.of(sitk.ReadImage(str(tmp_path / "out" / "oblique.nii.gz"))) == Geometry.of(sitk.ReadImage(str(tmp_path / "as_nifti.nii.gz")))


def test_corrupt_input_among_good_ones(model_ws, tmp_path, caplog):
    inp = tmp_path / "in"
    inp.mkdir()
    for p in phantom_images(model_ws)[:2]:
        (inp / p.name).write_bytes(p.read_bytes())
    bad = inp / "broken_0000.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really a NIfTI file" * 10)
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        assert predict(model_ws, inp, out, "--no-tta") == 1
    assert str(bad) in caplog.text and "Traceback" not in caplog.text
    assert len(list(out.glob("phantom_*.nii.gz"))) == 2
    assert not [p.name for p in out.iterdir() if p.name.startswith("broken") or p.name.startswith(".")]


def test_inputs_that_itk_would_read_silently_are_refused(model_ws, tmp_path, caplog):
    """NaN voxels (ITK reads them as 0) and a zero voxel size (ITK reads it as 1 mm) are errors
    naming the file; the good case is still predicted."""
    inp = tmp_path / "in"
    inp.mkdir()
    good = phantom_images(model_ws)[0]
    (inp / good.name).write_bytes(good.read_bytes())
    image = sitk.ReadImage(str(good), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(image)
    arr[0, 0, :5] = np.nan
    nan_img = sitk.GetImageFromArray(arr)
    nan_img.CopyInformation(image)
    sitk.WriteImage(nan_img, str(inp / "nanvox_0000.nii.gz"))
    raw = bytearray(gzip.decompress(good.read_bytes()))
    raw[80:84] = struct.pack("<f", 0.0)  # pixdim[1]: the x voxel size
    (inp / "zerospacing_0000.nii.gz").write_bytes(gzip.compress(bytes(raw)))
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        assert predict(model_ws, inp, out, "--no-tta") == 1
    assert "nanvox_0000.nii.gz" in caplog.text and "NaN" in caplog.text
    assert "zerospacing_0000.nii.gz" in caplog.text and "spacing" in caplog.text
    assert [p.name for p in out.glob("*.nii.gz")] == [good.name.replace("_0000", "")]


def test_shards_cover_every_case_once(model_ws, tmp_path):
    inp = phantom_images(model_ws)[0].parent
    out = tmp_path / "out"
    assert predict(model_ws, inp, out, "--no-tta", "--shard", "0/2") == 0
    first = {p.name for p in out.glob("*.nii.gz")}
    assert predict(model_ws, inp, out, "--no-tta", "--shard", "1/2") == 0
    second = {p.name for p in out.glob("*.nii.gz")} - first
    assert first and second and not first & second and len(first | second) == len(phantom_images(model_ws))
    cases = discover_inputs(inp)
    assert sorted(sum((select_shard(cases, (i, 3)) for i in range(3)), []), key=lambda c: c.case_id) == cases
    with pytest.raises(ValueError):
        parse_shard("2/2")
    assert predict(model_ws, inp, out, "--shard", "x") == 2


def test_load_model_errors_and_tta_mirroring(model_ws, tmp_path):
    with pytest.raises(MissingArtefactError, match="autoliver train"):
        load_model(model_ws.results(DATASET), "2.5d")
    with pytest.raises(MissingArtefactError, match="autoliver train"):
        load_model(model_ws.results(DATASET), "2d", folds=[3])
    model = load_model(model_ws.results(DATASET), "2d", folds=["0"], device="cpu")
    assert model.fold_names == ("0",) and not model.folds[0].network.deep_supervision
    # the mirrored predictor of a flip-equivariant function is the function itself
    import torch

    x = torch.randn(2, 1, 8, 8)
    f = lambda t: torch.cat([t, 2 * t, -t], dim=1)  # noqa: E731
    assert torch.allclose(mirrored(f, (2, 3))(x), f(x))
    image, geom = read_image(phantom_images(model_ws)[0], dtype=np.float32)
    a = predict_case(model, image, geom, tta=False)
    b = predict_case(model, image, geom, tta=True)
    assert a.seg.shape == b.seg.shape == geom.shape and a.seg.dtype == np.uint8
    assert a.probabilities is None and "network_s" in a.timings


def test_3d_with_tta_and_a_fold_ensemble(model_ws, tmp_path):
    src = phantom_images(model_ws)[0]
    _, geom = read_image(src)
    assert predict(model_ws, src, tmp_path / "3d", "-c", "3d_fullres") == 0  # every axis mirrored
    assert_same_geometry(tmp_path / "3d" / "phantom_000.nii.gz", geom)
    rep = json.loads((tmp_path / "3d" / "phantom_000.json").read_text())
    assert rep["configuration"] == "3d_fullres" and rep["tta"] is True
    # no -c: the first trained of 3d_fullres, 2.5d, 2d; no -f: every numbered fold
    assert load_model(model_ws.results(DATASET)).configuration.name == "3d_fullres"
    model = load_model(model_ws.results(DATASET), "2d")
    assert model.fold_names == ("0", "1")
    assert predict(model_ws, src, tmp_path / "ens", "-c", "2d", "--no-tta", "--save-probabilities") == 0
    assert json.loads((tmp_path / "ens" / "phantom_000.json").read_text())["folds"] == ["0", "1"]
    # the ensemble's probabilities are the mean of the two folds' probabilities
    for fold in ("0", "1"):
        assert predict(model_ws, src, tmp_path / fold, "-c", "2d", "-f", fold, "--no-tta", "--save-probabilities") == 0
    p = [np.load(tmp_path / d / "phantom_000.npz")["probabilities"].astype(np.float32) for d in ("0", "1", "ens")]
    assert np.allclose((p[0] + p[1]) / 2, p[2], atol=2e-3)


def test_model_folder_with_its_own_plans_and_a_latest_checkpoint_only(model_ws, tmp_path, caplog):
    import shutil

    # the model folder holds its own plans.json (training copies it there), so it is self-contained
    copied = model_ws.results(DATASET) / "plans.json"
    assert copied.read_bytes() == (model_ws.preprocessed(DATASET) / "plans.json").read_bytes()
    model = tmp_path / "my_model"
    shutil.copytree(model_ws.results(DATASET) / "2d" / "fold_0", model / "2d" / "fold_0")
    with pytest.raises(MissingArtefactError, match="plans.json"):
        load_model(model)
    shutil.copy(model_ws.preprocessed(DATASET) / "plans.json", model / "plans.json")
    fold = model / "2d" / "fold_0"
    (fold / "checkpoint_best.pt").unlink(missing_ok=True)
    (fold / "checkpoint_final.pt").rename(fold / "checkpoint_latest.pt")
    src = phantom_images(model_ws)[0]
    with caplog.at_level(logging.WARNING):
        assert main(["predict", "-i", str(src), "-o", str(tmp_path / "out"), "-m", str(model), "--no-tta", *FAST]) == 0
    assert "checkpoint_latest.pt" in caplog.text
    assert json.loads((tmp_path / "out" / "phantom_000.json").read_text())["configuration"] == "2d"
    assert_same_geometry(tmp_path / "out" / "phantom_000.nii.gz", read_image(src)[1])
