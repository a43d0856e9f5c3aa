"""Model packages (autoliver.io.model_package, api.export_model / install_model): a package of the
tiny random-weight model folder installs into a folder that predicts bit-identically to the
original; its manifest carries hashes, versions and a model card whose cross-validation figures
are the fold metrics files'; a tampered, altered or too-new package is refused and installing the
same package twice changes nothing."""

import hashlib
import json
import zipfile
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import DATASET, snapshot

from autoliver import api
from autoliver.core.artefacts import FoldMetrics, InferencePlan
from autoliver.core.errors import MissingArtefactError
from autoliver.infer.ensemble import load_ensemble
from autoliver.infer.pipeline import predict_case
from autoliver.io.archive import UnsafeArchiveError
from autoliver.io.atomic import write_json
from autoliver.io.images import read_image
from autoliver.io.model_package import (
    MANIFEST,
    ModelPackageError,
    export_package,
    install_package,
    is_model_package,
    read_manifest,
    resolve_model_package,
)
from planning.plans import Plans

pytestmark = pytest.mark.usefixtures("single_thread")

DICE = {"0": {"case_a": (0.91, 0.40), "case_b": (0.85, 1.0)}, "1": {"case_c": (0.80, 0.0)}}


def add_metrics_and_plan(ws) -> Plans:
    """Fold metrics for 2d folds 0 and 1 and an inference plan choosing them (as training and
    find_best_configuration write them)."""
    model = ws.results(DATASET)
    plans = Plans.load(model / "plans.json")
    for fold, cases in DICE.items():
        m = FoldMetrics({c: {"liver": lv, "tumour": tu} for c, (lv, tu) in cases.items()})
        write_json(model / "2d" / f"fold_{fold}" / "metrics.json", m.to_json())
    plan = InferencePlan(dataset=DATASET, plans_hash=plans.selection_hash(["2d"]), configurations=("2d",), folds={"2d": ("0", "1")},
                         postprocessing=(), evidence={"cv_dice": {"liver": 0.85}})
    write_json(model / "inference_plan.json", plan.to_json())
    return plans


def rewrite_zip(source, dest, change):
    """A copy of the zip ``source`` with member bytes changed by ``change(name, data) -> data | None`` (None: dropped)."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(dest, "w") as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info, data)
    return dest


def small_case(ws):
    """A phantom cropped in-plane (the same origin: the crop starts at voxel 0)."""
    image, geometry = read_image(sorted((ws.raw / DATASET / "imagesTr").glob("*_0000.nii.gz"))[0])
    return image[:, :40, :44], replace(geometry, shape=(image.shape[0], 40, 44))


def test_round_trip_predicts_bit_identically_and_card_has_cv_metrics(model_ws, tmp_path):
    plans = add_metrics_and_plan(model_ws)
    package = api.export_model(DATASET, model_ws, output=tmp_path / "model.zip")
    manifest, _ = read_manifest(package)
    assert manifest["format_version"] == 1 and manifest["torch_version"] == torch.__version__ and manifest["autoliver_version"]
    assert list(manifest["configurations"]) == ["2d"]  # the inference plan's configuration, with its folds
    assert manifest["configurations"]["2d"]["configuration_hash"] == plans.configuration_hash("2d")
    assert manifest["plans_hash"] == plans.plans_hash and manifest["data_hashes"] == {"fullres": plans.data_hash("fullres")}
    assert sorted(manifest["files"]) == ["2d/fold_0/checkpoint_final.pt", "2d/fold_0/metrics.json", "2d/fold_1/checkpoint_final.pt",
                                         "2d/fold_1/metrics.json", "dataset.json", "inference_plan.json", "plans.json"]
    with zipfile.ZipFile(package) as zf:
        for name, entry in manifest["files"].items():
            assert hashlib.sha256(zf.read(name)).hexdigest() == entry["sha256"]
    card = manifest["model_card"]
    assert "not a medical device" in card["intended_use"]
    data = card["training_data"]
    assert data["dataset"] == DATASET and data["n_training_cases"] == 4 and data["modality"] == {"0": "CT"}
    assert data["labels"] == {"background": 0, "liver": 1, "tumour": 2} and len(data["spacing_mm"]["median"]) == 3
    cv = card["cross_validation"]["2d"]
    for fold, cases in DICE.items():  # the fold metrics files' figures, per fold and over folds
        assert cv["folds"][fold]["n_cases"] == len(cases)
        assert cv["folds"][fold]["mean_dice"]["liver"] == pytest.approx(np.mean([lv for lv, _ in cases.values()]))
        assert cv["folds"][fold]["mean_dice"]["tumour"] == pytest.approx(np.mean([tu for _, tu in cases.values()]))
    assert cv["mean_dice"]["liver"] == pytest.approx(np.mean([(0.91 + 0.85) / 2, 0.80]))
    assert card["default_prediction"]["configurations"] == ["2d"]

    installed = api.install_model(package, model_ws)
    assert installed == model_ws.root / "models" / DATASET
    slim = torch.load(installed / "2d" / "fold_0" / "checkpoint_final.pt", weights_only=True)
    assert "optimiser" not in slim and "rng" not in slim and "history" not in slim and slim["weights"]
    image, geometry = small_case(model_ws)
    original = load_ensemble(model_ws.results(DATASET), device="cpu", precision="fp32")
    unpacked = load_ensemble(installed, device="cpu", precision="fp32")
    assert unpacked.folds == original.folds == {"2d": ["0", "1"]}
    a = predict_case(original, image, geometry, tta=False, roi=False, save_probabilities=True)
    b = predict_case(unpacked, image, geometry, tta=False, roi=False, save_probabilities=True)
    assert a.seg.shape == image.shape and np.array_equal(a.seg, b.seg)
    assert np.array_equal(a.probabilities, b.probabilities) and np.ptp(a.probabilities) > 0  # bit-identical, and not a constant map


def test_install_is_idempotent_and_refuses_another_model_in_place(model_ws, tmp_path):
    package = export_package(model_ws.results(DATASET), tmp_path / "a.zip", configurations=["3d_fullres"], created="2000-01-01T00:00:00+00:00")
    target = tmp_path / "installed"
    assert install_package(package, target) == target
    before = snapshot(target)
    assert install_package(package, target) == target
    assert snapshot(target) == before  # nothing rewritten
    other = export_package(model_ws.results(DATASET), tmp_path / "b.zip", configurations=["2d"], folds=["1"])
    with pytest.raises(ModelPackageError, match="holds something other than"):
        install_package(other, target)
    assert snapshot(target) == before
    install_package(other, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["2d", "dataset.json", "manifest.json", "plans.json"]
    assert [p.name for p in (target / "2d").iterdir()] == ["fold_1"]
    (target / "2d" / "fold_1" / "checkpoint_final.pt").write_bytes(b"damaged")  # a damaged install is repaired
    install_package(other, target)
    assert (target / "2d" / "fold_1" / "checkpoint_final.pt").stat().st_size > 1000


def test_tampered_altered_and_newer_packages_are_refused(model_ws, tmp_path):
    package = export_package(model_ws.results(DATASET), tmp_path / "m.zip", configurations=["2d"], folds=["0"])

    def tamper(name, data):
        return data[:-8] + bytes(8) if name.endswith(".pt") else data

    for bad, fragment in (
        (rewrite_zip(package, tmp_path / "t.zip", tamper), "member '2d/fold_0/checkpoint_final.pt' does not match its sha256"),
        (rewrite_zip(package, tmp_path / "p.zip", lambda n, d: d.replace(b'"batch_size": 4', b'"batch_size": 5') if n == "plans.json" else d),
         "member 'plans.json' does not match its sha256"),
        (rewrite_zip(package, tmp_path / "e.zip", lambda n, d: d), None),
    ):
        if fragment is None:  # an extra member not in the manifest
            with zipfile.ZipFile(bad, "a") as zf:
                zf.writestr("2d/fold_0/extra.py", "import os")
            fragment = "member '2d/fold_0/extra.py' is not listed in manifest.json"
        with pytest.raises(ModelPackageError, match=fragment.replace("(", r"\(")):
            install_package(bad, tmp_path / "target")
        assert not (tmp_path / "target").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".target")]
    dropped = rewrite_zip(package, tmp_path / "d.zip", lambda n, d: None if n == "dataset.json" else d)
    with pytest.raises(ModelPackageError, match="dataset.json is listed in manifest.json but missing"):
        install_package(dropped, tmp_path / "target")

    def newer(name, data):
        if name != MANIFEST:
            return data
        m = json.loads(data)
        m["format_version"] = 99
        return json.dumps(m).encode()

    with pytest.raises(ModelPackageError, match="format 99 was written by a newer autoliver"):
        install_package(rewrite_zip(package, tmp_path / "n.zip", newer), tmp_path / "target")
    slip = tmp_path / "slip.zip"
    with zipfile.ZipFile(slip, "w") as zf:
        zf.writestr(MANIFEST, "{}")
        zf.writestr("../../evil.pt", "x")
    with pytest.raises(UnsafeArchiveError, match="'..'"):
        install_package(slip, tmp_path / "target")
    assert not (tmp_path / "evil.pt").exists()


def test_dependencies_follow_and_folds_checked(model_ws, tmp_path):
    package = export_package(model_ws.results(DATASET), tmp_path / "c.zip", configurations=["3d_cascade_fullres"])
    manifest, _ = read_manifest(package)
    assert sorted(manifest["configurations"]) == ["3d_cascade_fullres", "3d_lowres"]  # the cascade's input stage comes along
    assert "inference_plan.json" not in manifest["files"]
    with pytest.raises(MissingArtefactError, match=r"fold\(s\) 3 not trained; run `autoliver train -d .* 2d 3`"):
        export_package(model_ws.results(DATASET), tmp_path / "x.zip", configurations=["2d"], folds=["3"])
    assert not (tmp_path / "x.zip").exists()
    add_metrics_and_plan(model_ws)
    other = export_package(model_ws.results(DATASET), tmp_path / "f.zip", configurations=["3d_fullres"])
    assert "inference_plan.json" not in read_manifest(other)[0]["files"]  # the plan's 2d is not in it: left out


def test_resolve_model_package_caches_by_hash(model_ws, tmp_path):
    package = export_package(model_ws.results(DATASET), tmp_path / "r.zip", configurations=["2d"], folds=["0"])
    cache = tmp_path / "cache"
    folder = resolve_model_package(package, cache)
    digest = hashlib.sha256(package.read_bytes()).hexdigest()
    assert folder == cache / digest[:16] and (folder / "plans.json").is_file()
    assert resolve_model_package(package, cache) == folder and len(list(cache.iterdir())) == 1
    assert resolve_model_package(folder, cache) == folder  # a folder is a model folder already
    assert is_model_package(package) and not is_model_package(folder) and not is_model_package(folder / "plans.json")
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("Dataset900/nnUNetTrainer__nnUNetPlans__2d/plans.json", "{}")
    assert not is_model_package(other)  # another tool's export
