"""A small nnU-Net v2 model trained by nnU-Net itself, for the ``nnunet_model`` benchmark and the
``tests/data/nnunet_tiny`` fixture. Runs under nnU-Net's own Python (imports nnunetv2, torch,
numpy and SimpleITK, never autoliver); ``tests/data/nnunet_tiny/make.py`` and
``benchmarks/nnunet_model.py`` call it.

``build_model``: a raw dataset (nnU-Net v2 layout) from real CT cases, nnU-Net's own
``nnUNetv2_plan_and_preprocess``, then a plans file ``nnUNetPlansTiny`` whose ``3d_fullres``
has a smaller U-Net (4 stages, ``features``), patch and spacing, preprocessed again by
``nnUNetv2_preprocess``; a one-fold split; nnU-Net's stock ``nnUNetTrainer`` instantiated
directly (its trainer lookup is not used) for ``epochs`` x ``iters`` iterations on the CPU.
Returns the model folder ``nnUNetTrainer__nnUNetPlansTiny__3d_fullres``.

``predict``: ``nnUNetv2_predict_from_modelfolder`` on a folder of images (its own process).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

DATASET_ID, DATASET_NAME = 990, "Dataset990_LiverTiny"
PLANS = "nnUNetPlansTiny"
CONFIG = "3d_fullres"
DEFAULT_TRAIN = ("lits117_128cube", "totalseg_example_ct_full", "totalseg_example_dicom20", "dcmqi_ct3slice")


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _env(work: Path, threads: int) -> dict:
    return {**os.environ, "nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
            "nnUNet_results": str(work / "results"), "nnUNet_compile": "false", "nnUNet_n_proc_DA": str(threads),
            "OMP_NUM_THREADS": str(threads)}


def make_raw(work: Path, data_dir: Path, cases: list[str]) -> Path:
    """``work/raw/Dataset990_LiverTiny`` from ``<case>_image/_label.nii.gz`` of ``data_dir``."""
    raw = work / "raw" / DATASET_NAME
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(parents=True, exist_ok=True)
    for case in cases:
        shutil.copyfile(data_dir / f"{case}_image.nii.gz", raw / "imagesTr" / f"{case}_0000.nii.gz")
        shutil.copyfile(data_dir / f"{case}_label.nii.gz", raw / "labelsTr" / f"{case}.nii.gz")
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
                                                  "numTraining": len(cases), "file_ending": ".nii.gz"}, indent=2))
    return raw


def tiny_plans(plans: dict, features: list[int], patch: list[int], spacing: list[float], batch: int) -> dict:
    """``plans`` with only a smaller ``3d_fullres`` (4 stages, stride 2 below the first)."""
    conf = dict(plans["configurations"][CONFIG])
    n = len(features)
    arch = dict(conf["architecture"])
    kw = dict(arch["arch_kwargs"])
    kw.update(n_stages=n, features_per_stage=list(features), kernel_sizes=[[3, 3, 3]] * n,
              strides=[[1, 1, 1]] + [[2, 2, 2]] * (n - 1), n_conv_per_stage=[2] * n, n_conv_per_stage_decoder=[2] * (n - 1))
    arch["arch_kwargs"] = kw
    conf.update(architecture=arch, patch_size=list(patch), spacing=list(spacing), batch_size=batch,
                data_identifier=f"{PLANS}_{CONFIG}")
    out = dict(plans, plans_name=PLANS, configurations={CONFIG: conf})
    return out


def build_model(work: str, data_dir: str, cases: list[str] | None = None, val_case: str | None = None, epochs: int = 4,
                iters: int = 50, features: list[int] = (4, 8, 16, 32), patch: list[int] = (32, 64, 64),
                spacing: list[float] = (3.0, 1.5, 1.5), batch: int = 2, threads: int = 2, seed: int = 0) -> dict:
    work_p = Path(work).absolute()
    cases = list(cases or DEFAULT_TRAIN)
    env = _env(work_p, threads)
    os.environ.update(env)  # nnunetv2 reads its folders at import
    t0 = time.perf_counter()
    make_raw(work_p, Path(data_dir), cases)
    subprocess.run([_bin("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", CONFIG, "-np", str(threads),
                    "-npfp", str(threads), "--no_pp"], check=True, env=env)
    pre = work_p / "preprocessed" / DATASET_NAME
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    (pre / f"{PLANS}.json").write_text(json.dumps(tiny_plans(plans, list(features), list(patch), list(spacing), batch), indent=2))
    subprocess.run([_bin("nnUNetv2_preprocess"), "-d", str(DATASET_ID), "-plans_name", PLANS, "-c", CONFIG, "-np", str(threads)],
                   check=True, env=env)
    val = val_case or cases[-1]
    (pre / "splits_final.json").write_text(json.dumps([{"train": [c for c in cases if c != val], "val": [val]}]))
    t_prep = time.perf_counter() - t0

    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(threads)
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    plans_t = json.loads((pre / f"{PLANS}.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())
    plans_t["continue_training"] = False  # what nnUNetv2_train adds before building the trainer
    trainer = nnUNetTrainer(plans=plans_t, configuration=CONFIG, fold=0, dataset_json=dataset_json, device=torch.device("cpu"))
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = epochs, iters, max(1, iters // 10)
    t1 = time.perf_counter()
    trainer.run_training()
    model_dir = Path(trainer.output_folder_base)
    return {"model_dir": str(model_dir), "preprocess_s": t_prep, "train_s": time.perf_counter() - t1,
            "cases": cases, "val_case": val, "epochs": epochs, "iters": iters, "features": list(features),
            "patch": list(patch), "spacing": list(spacing)}


def predict(model_dir: str, images: str, output: str, folds: list[str] = ("0",), tta: bool = True, threads: int = 2,
            checkpoint: str = "checkpoint_final.pth", procs: int | None = None) -> list[str]:
    """The ``nnUNetv2_predict_from_modelfolder`` command line (run it with ``subprocess``)."""
    cmd = [_bin("nnUNetv2_predict_from_modelfolder"), "-i", images, "-o", output, "-m", model_dir, "-f", *folds,
           "-chk", checkpoint, "-device", "cpu", "--disable_progress_bar"]
    if not tta:
        cmd.append("--disable_tta")
    if procs is not None:
        cmd += ["-npp", str(procs), "-nps", str(procs)]
    return cmd


def strip_checkpoint(src: str, dst: str) -> None:
    """A copy of a checkpoint without the optimiser and grad-scaler state (what prediction reads stays)."""
    import torch

    ck = torch.load(src, map_location="cpu", weights_only=False)  # nnU-Net's own file, in nnU-Net's own environment
    for key in ("optimizer_state", "grad_scaler_state"):
        ck.pop(key, None)
    torch.save(ck, dst)


def variant_model(src_model: str, dest_root: str, kind: str, seed: int = 0) -> str:
    """A copy of a model folder whose plans gain a ``2d`` (PlainConvUNet) or ``3d_resenc``
    (ResidualEncoderUNet) configuration, with a checkpoint of nnU-Net's own network for it,
    randomly initialised (nnU-Net's initialisation, ``seed``): a check of the layouts and
    the 2d path that needs no training."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    src = Path(src_model)
    plans = json.loads((src / "plans.json").read_text())
    base = plans["configurations"][CONFIG]
    kw = dict(base["architecture"]["arch_kwargs"])
    if kind == "2d":
        kw.update(conv_op="torch.nn.modules.conv.Conv2d", kernel_sizes=[[3, 3]] * 4, strides=[[1, 1]] + [[2, 2]] * 3,
                  norm_op="torch.nn.modules.instancenorm.InstanceNorm2d")
        conf = dict(base, patch_size=[64, 64], spacing=[1.5, 1.5], data_identifier=f"{PLANS}_2d")
        cls, axes = "dynamic_network_architectures.architectures.unet.PlainConvUNet", (0, 1)
    elif kind == "3d_resenc":
        kw["n_blocks_per_stage"] = [1, 2, 2, 2]
        kw.pop("n_conv_per_stage")
        conf = dict(base, data_identifier=f"{PLANS}_3d_resenc")
        cls, axes = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet", (0, 1, 2)
    else:
        raise ValueError(kind)
    conf["architecture"] = {"network_class_name": cls, "arch_kwargs": kw, "_kw_requires_import": base["architecture"]["_kw_requires_import"]}
    plans["configurations"][kind] = conf
    dest = Path(dest_root) / f"nnUNetTrainer__{PLANS}__{kind}"
    (dest / "fold_0").mkdir(parents=True, exist_ok=True)
    (dest / "plans.json").write_text(json.dumps(plans, indent=2))
    shutil.copyfile(src / "dataset.json", dest / "dataset.json")
    torch.manual_seed(seed)
    net = get_network_from_plans(cls, kw, conf["architecture"]["_kw_requires_import"], 1, 3, allow_init=True, deep_supervision=False)
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": axes,
                "init_args": {"configuration": kind}, "current_epoch": 0}, dest / "fold_0" / "checkpoint_final.pth")
    return str(dest)
