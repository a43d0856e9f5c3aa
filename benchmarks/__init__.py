"""autoliver's benchmarks, run by one harness: ``python -m benchmarks NAME [--quick] [--out DIR]``.

Each benchmark is a module of this package with ``run(ctx) -> dict`` (and optionally
``add_arguments(parser)``), registered below by name; the shared pieces (case builders, the
input cache, the per-child peak memory, the loader-throughput rule, the report) live in
``benchmarks.harness``. See README.md.

This module and ``benchmarks.child`` import only the standard library: the child entry point
also runs under nnU-Net's own Python.
"""

from __future__ import annotations

import importlib

# name -> (module, one-line description)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "plan_and_preprocess": ("benchmarks.plan_and_preprocess", "fingerprint + planning + preprocessing, against nnU-Net v2"),
    "train_vs_nnunet": ("benchmarks.train_vs_nnunet", "training iteration speed, loader samples/s and peak memory, against nnU-Net v2"),
    "predict_vs_nnunet": ("benchmarks.predict_vs_nnunet", "prediction with a model each tool trained for the same budget: s/case, memory, Dice, against nnU-Net v2"),
    "nnunet_model": ("benchmarks.nnunet_model", "a model nnU-Net v2 trained, predicted by nnUNetv2_predict and autoliver: label agreement, s/case, peak memory"),
    "predict_roi": ("benchmarks.predict_roi", "autoliver prediction with ROI-first on and off: seconds per case, Dice, peak memory"),
    "predict_gpu": ("benchmarks.predict_gpu", "prediction in memory per precision / TTA / ROI setting: seconds, GPU and host peak memory, Dice"),
    "loader": ("benchmarks.loader", "training loader samples/s with 0, 1, 2 workers, next to the network's train step"),
    "crf": ("benchmarks.crf", "dense CRF runtime, peak memory and Dice; own implementation against pydensecrf2"),
    "postprocess_cv": ("benchmarks.postprocess_cv", "model selection and post-processing on cross-validation: Dice change and runtime per step"),
    "flops": ("benchmarks.flops", "achieved GFLOP/s of a network forward pass, fp32 against bf16 autocast"),
    "cpu_engines": ("benchmarks.cpu_engines", "CPU engines (torch, ONNX Runtime, OpenVINO): s/patch, s/case, peak memory, agreement, GFLOP/s"),
    "storage_formats": ("benchmarks.storage_formats", "preprocessed-array formats: disk size, write time, random-patch reads"),
}


def load(name: str):
    """The benchmark module registered as ``name``."""
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return importlib.import_module(BENCHMARKS[name][0])
