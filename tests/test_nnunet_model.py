"""Models trained by nnU-Net v2, predicted by autoliver (autoliver.infer.nnunet_model).

The reference is ``tests/data/nnunet_tiny``: a small model trained by nnU-Net's own trainer and
``nnUNetv2_predict_from_modelfolder``'s output for two inputs (see its README and make.py).
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from autoliver.core.errors import AutoliverError, CheckpointError
from autoliver.infer.nnunet_model import is_nnunet_model, load_nnunet_model
from autoliver.infer.runner import PredictOptions, predict_inputs
from autoliver.io.archive import UnsafeArchiveError
from autoliver.io.nnunet_files import UnsafeCheckpointError, extract_zip, read_checkpoint
from autoliver.nets.nnunet_arch import UnsupportedModelError, build_nnunet_network

TINY = Path(__file__).parent / "data" / "nnunet_tiny"
MODEL = TINY / "model" / "nnUNetTrainer__nnUNetPlansTiny__3d_fullres"


def labels(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def dice(a: np.ndarray, b: np.ndarray, c: int) -> float:
    x, y = a == c, b == c
    return 1.0 if not x.any() and not y.any() else 2.0 * (x & y).sum() / (x.sum() + y.sum())


def test_fixture_network_loads_strictly_with_nnunet_key_names():
    plans = json.loads((MODEL / "plans.json").read_text())
    weights = read_checkpoint(MODEL / "fold_0" / "checkpoint_final.pth")["network_weights"]
    net = build_nnunet_network(plans["configurations"]["3d_fullres"]["architecture"], 1, 3)
    mine = net.state_dict()
    assert list(mine) == list(weights)  # same names, same order
    assert all(mine[k].shape == weights[k].shape for k in mine)
    net.load_state_dict(weights, strict=True)
    assert "decoder.encoder.stages.0.0.convs.0.all_modules.0.weight" in weights
    with torch.no_grad():
        out = net.eval()(torch.zeros(1, 1, 16, 32, 32))
    assert out.shape == (1, 3, 16, 32, 32)


def test_residual_encoder_unet_has_nnunet_layout():
    # counts and names measured on dynamic_network_architectures 0.4.4 for the same arch_kwargs
    kw = {"n_stages": 4, "features_per_stage": [4, 8, 16, 32], "conv_op": "torch.nn.modules.conv.Conv3d",
          "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
          "n_blocks_per_stage": [1, 2, 3, 2], "n_conv_per_stage_decoder": [2, 2, 2], "conv_bias": True,
          "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
          "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet", "arch_kwargs": kw}
    keys = build_nnunet_network(arch, 1, 3).state_dict()
    assert len(keys) == 368
    assert "encoder.stem.convs.0.norm.weight" in keys
    assert "encoder.stages.1.blocks.0.skip.1.conv.weight" in keys  # avg-pool then 1x1 projection
    assert "decoder.stages.0.convs.1.all_modules.1.bias" in keys  # the plain decoder
    both = build_nnunet_network({**arch, "network_class_name": "ResidualUNet"}, 1, 3).state_dict()
    assert len(both) == 434 and "decoder.stages.0.blocks.0.skip.0.conv.weight" in both


def test_unknown_network_class_and_custom_trainer_are_named(tmp_path):
    arch = {"network_class_name": "my_package.FancyNet", "arch_kwargs": {}}
    with pytest.raises(UnsupportedModelError, match="my_package.FancyNet"):
        build_nnunet_network(arch, 1, 3)
    custom = tmp_path / "nnUNetTrainerMyFancyNet__nnUNetPlansTiny__3d_fullres"
    shutil.copytree(MODEL, custom)
    with pytest.raises(UnsupportedModelError, match="nnUNetTrainerMyFancyNet"):
        load_nnunet_model(custom)
    cascade = tmp_path / "nnUNetTrainer__nnUNetPlansTiny__3d_cascade_fullres"
    shutil.copytree(MODEL, cascade)
    plans = json.loads((cascade / "plans.json").read_text())
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    (cascade / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(UnsupportedModelError, match="cascade"):
        load_nnunet_model(cascade)


def test_hostile_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    model = tmp_path / MODEL.name
    shutil.copytree(MODEL, model)
    torch.save({"network_weights": {}, "trainer_name": "nnUNetTrainer", "x": Payload()}, model / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(UnsafeCheckpointError, match="refused as unsafe"):
        load_nnunet_model(model)
    assert not marker.exists()
    with pytest.raises(AutoliverError):
        read_checkpoint(model / "fold_0" / "checkpoint_final.pth")
    (model / "fold_0" / "checkpoint_final.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_nnunet_model(model)
    assert not marker.exists()


def _zip(src: Path, dest: Path, prefix: str = "Dataset990_LiverTiny") -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for f in sorted(src.rglob("*")):
            zf.write(f, f"{prefix}/{src.name}/{f.relative_to(src)}")
    return dest


def test_export_zip_form_loads_the_same_network(tmp_path):
    z = _zip(MODEL, tmp_path / "model.zip")
    assert is_nnunet_model(z) and is_nnunet_model(MODEL) and is_nnunet_model(MODEL.parent)
    from_zip = load_nnunet_model(z, cache_dir=tmp_path / "cache")
    direct = load_nnunet_model(MODEL)
    a, b = from_zip.networks[0].network.state_dict(), direct.networks[0].network.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert from_zip.mirror_axes == direct.mirror_axes == (0, 1, 2)
    assert extract_zip(z, tmp_path / "cache") == from_zip.model_dir.parents[1]  # reused, not extracted again


def test_zip_with_parent_paths_or_links_is_refused(tmp_path):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("Dataset990_X/ok.txt", "fine")
        zf.writestr("../escaped.txt", "outside")
    with pytest.raises(UnsafeArchiveError, match="escaped"):
        extract_zip(bad, tmp_path / "cache")
    assert not (tmp_path / "escaped.txt").exists()
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("ok.txt"))  # nothing extracted
    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as zf:
        info = zipfile.ZipInfo("Dataset990_X/plans.json")
        info.external_attr = (0o120777 << 16)  # a symbolic link
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        extract_zip(link, tmp_path / "cache")
    with pytest.raises(UnsafeArchiveError, match="limit"):
        extract_zip(_zip(MODEL, tmp_path / "m.zip"), tmp_path / "cache", max_bytes=1000)


def _agreement(tmp_path: Path, case: str) -> None:
    images = tmp_path / "in"
    images.mkdir()
    shutil.copyfile(TINY / "images" / f"{case}_0000.nii.gz", images / f"{case}_0000.nii.gz")
    model = load_nnunet_model(MODEL, device="cpu")
    summary = predict_inputs(model, images, tmp_path / "out", PredictOptions(progress=False, prefetch=False))
    assert not summary.failed and summary.predicted == [case]
    mine, ref = labels(tmp_path / "out" / f"{case}.nii.gz"), labels(TINY / "expected" / f"{case}.nii.gz")
    assert mine.shape == ref.shape
    assert (ref == 1).sum() > 1000  # the reference is not empty: the comparison means something
    assert (mine == ref).mean() >= 0.995
    assert dice(mine, ref, 1) >= 0.99
    report = json.loads((tmp_path / "out" / f"{case}.json").read_text())
    assert report["models"]["configurations"] == ["nnunet:3d_fullres"] and report["tta"] is True
    out_img = sitk.ReadImage(str(tmp_path / "out" / f"{case}.nii.gz"))
    in_img = sitk.ReadImage(str(images / f"{case}_0000.nii.gz"))
    assert out_img.GetSpacing() == pytest.approx(in_img.GetSpacing()) and out_img.GetOrigin() == pytest.approx(in_img.GetOrigin())


def test_agrees_with_nnunet_predict_on_anisotropic_input(tmp_path):
    _agreement(tmp_path, "aniso")  # 5 mm slices: nnU-Net's separate-z resampling both ways


def test_agrees_with_nnunet_predict_on_isotropic_input(tmp_path):
    _agreement(tmp_path, "ct48")


def test_batched_mirroring_equals_one_copy_at_a_time():
    from autoliver.infer.nnunet_model import mirrored_batch
    from autoliver.infer.predictor import mirrored

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3, padding=1), torch.nn.InstanceNorm3d(3, affine=True),
                              torch.nn.LeakyReLU(), torch.nn.Conv3d(3, 3, (1, 3, 5), padding=(0, 1, 2))).eval()
    x = torch.randn(2, 1, 6, 8, 10)
    with torch.no_grad():
        one, batched = mirrored(net, (2, 3, 4))(x), mirrored_batch(net, (2, 3, 4))(x)
        plain = net(x)
    torch.testing.assert_close(batched, one, rtol=1e-5, atol=1e-5)
    assert (one - plain).abs().max() > 1e-3  # mirroring changed something: the test can fail
