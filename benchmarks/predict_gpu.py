"""Prediction on a GPU, in memory: seconds per LiTS-size case, GPU and host peak memory, and Dice,
per precision (fp32 / fp16 / bf16), test-time augmentation on/off and ROI-first on/off.

Self-contained, in memory (no image files: it runs where only torch, numpy and SciPy are
installed and blosc2 is carried): synthetic phantoms (``autoliver.examples.phantom``) are
fingerprinted and planned with ``planning`` for ``--gpu-memory``, preprocessed into a workspace,
and one configuration is trained on every case with ``api.train`` for ``--train-minutes``
(workspace and model cached under these settings). Then each setting predicts each of
``--test-cases`` LiTS-size phantoms (``--slices`` x 512 x 512 at 1.0 x 0.77 x 0.77 mm) with
``predict_case`` in a fresh process of its own, so that its host peak (VmHWM) and GPU peak
(``max_memory_allocated``) are its own. Seconds per case cover preprocessing, network and
export to the input grid (file reading and writing are not included). Runs on the CPU where
there is no GPU.
"""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import cache, cases, measure

DATASET = "Dataset950_GpuBench"


def add_arguments(p) -> None:
    p.add_argument("--configuration", default="3d_fullres")
    p.add_argument("--train-minutes", type=float, default=4.0)
    p.add_argument("--n-train", type=int, default=6)
    p.add_argument("--train-shape", type=int, nargs=3, default=[200, 384, 384])
    p.add_argument("--train-spacing", type=float, nargs=3, default=list(cases.LITS_SPACING))
    p.add_argument("--slices", type=int, default=450)
    p.add_argument("--test-cases", type=int, default=2)
    p.add_argument("--gpu-memory", type=float, default=8.0, help="plan for this GPU memory in GB (default: nnU-Net's 8)")


def build_workspace(root: Path, n_train: int, shape, spacing, memory_gb: float, shrink_to: dict | None) -> None:
    """Fingerprint, plan and preprocess ``n_train`` phantoms in memory into a workspace at ``root``."""
    from dataclasses import replace

    from autoliver import api
    from autoliver.core.layout import Workspace
    from autoliver.io.atomic import write_json
    from autoliver.preprocess.case import iter_preprocessed
    from autoliver.preprocess.runner import DATASET_PROPERTIES, case_seed
    from autoliver.preprocess.storage import save_case
    from planning.fingerprint import analyse_case, reduce_fingerprint
    from planning.planner import plan_experiment

    data = {f"phantom_{k:03d}": cases.phantom(shape, spacing, [7, k]) for k in range(n_train)}
    analysed = {cid: analyse_case(img, lab, geo.spacing, geo.direction, np.random.default_rng(k)) for k, (cid, (img, lab, geo)) in enumerate(data.items())}
    dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2}, "numTraining": n_train, "file_ending": ".nii.gz"}
    plans = plan_experiment(reduce_fingerprint(analysed, dataset_json, DATASET, "in-memory"), memory_gb=memory_gb)
    if shrink_to:
        plans = replace(plans, configurations={**plans.configurations, **{c: cases.shrink(plans.configurations[c], **kw) for c, kw in shrink_to.items()}})
    pre = Workspace(root).preprocessed(DATASET)
    api.write_plans(plans, pre / "plans.json")
    idents = sorted(plans.data_spacings)
    for cid, (img, lab, geo) in data.items():
        for ident, arr, seg, props in iter_preprocessed(img, geo, lab, plans, idents, seed=case_seed(cid)):
            props["plans_hash"] = plans.plans_hash
            save_case(pre / ident, cid, arr, seg, props)
    for ident in idents:
        write_json(pre / ident / DATASET_PROPERTIES, {"dataset_name": DATASET, "plans_hash": plans.plans_hash, "data_identifier": ident,
                                                      "spacing": list(plans.data_spacings[ident]), "normalisation": plans.to_json()["normalisation"],
                                                      "cases": sorted(data)})


def settings(supported: set[str], quick: bool) -> list[dict]:
    """The prediction settings to compare (only the keywords predict_case accepts)."""
    if quick:
        return [{"tta": False, "precision": "fp32", "roi": roi} for roi in (True, False)]
    grid = [{"tta": True}, {"tta": False}]
    if "precision" in supported:
        grid = [dict(g, precision=p) for g in grid for p in ("fp32", "fp16", "bf16")]
    if "roi" in supported:
        grid = [dict(g, roi=r) for g in grid for r in (True, False)]
    return grid


def measure_setting(model_dir: str, configuration: str, device: str, case: str, setting: dict) -> dict:
    """One setting on one case, in a fresh process (``benchmarks.child``)."""
    import torch

    from autoliver.evaluate.overlap import case_dice
    from autoliver.infer.pipeline import predict_case
    from autoliver.infer.predictor import load_model
    from autoliver.io.images import Geometry

    image, label, geometry = cases.load_npz(case)
    model = load_model(model_dir, configuration, ["all"], device)
    cuda = device == "cuda"
    if cuda:  # warm-up (kernels, allocator) on a corner of the case
        crop = image[:64, :128, :128].copy()
        predict_case(model, crop, Geometry(crop.shape, geometry.spacing, geometry.origin, geometry.direction), tta=False, roi=False)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    pred = predict_case(model, image, geometry, **setting)
    if cuda:
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - t0, "timings": pred.timings, "dice": case_dice(pred.seg, label),
            "gpu_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def run(ctx) -> dict:
    import torch

    from autoliver import api
    from autoliver.core.layout import Workspace
    from autoliver.infer.pipeline import predict_case
    from autoliver.train.options import TrainOptions

    a = ctx.args
    device = "cuda" if torch.cuda.is_available() and not ctx.quick else "cpu"
    config = a.configuration
    params = {"n_train": ctx.pick(a.n_train, 2), "shape": ctx.pick(a.train_shape, [24, 96, 96]), "spacing": ctx.pick(a.train_spacing, [8.0, 4.0, 4.0]),
              "gpu_memory": a.gpu_memory, "configuration": config, "minutes": ctx.pick(a.train_minutes, None), "device": device,
              "shrink": {config: cases.TINY[config]} if ctx.quick else None}

    def build(folder: Path) -> None:
        t0 = time.perf_counter()
        build_workspace(folder, params["n_train"], params["shape"], params["spacing"], a.gpu_memory, params["shrink"])
        prep_s = time.perf_counter() - t0
        options = TrainOptions(budget_minutes=a.train_minutes, device=device, progress=False, n_workers=4) if not ctx.quick else \
            TrainOptions(epochs=1, iters_per_epoch=2, val_iters=1, device=device, progress=False, n_workers=0, final_validation=False)
        result = api.train(DATASET, config, "all", Workspace(folder), options)
        (folder / "train.json").write_text(json.dumps({"epochs": result.epochs, "prep_seconds": prep_s, "train_minutes": params["minutes"]}))

    entry = cache.entry(ctx, "gpu_model", params, build)
    model_dir = entry / "results" / DATASET
    shape, spacing = (ctx.pick(a.slices, 40), *ctx.pick((512, 512), (96, 96))), ctx.pick(cases.LITS_SPACING, (4.0, 3.0, 3.0))
    rows, runs = [], []
    for k in range(ctx.pick(a.test_cases, 1)):
        case = cache.entry(ctx, "npz_phantom", {"shape": list(shape), "spacing": list(spacing), "seed": [7, 1000 + k]}, lambda f: cases.save_npz(
            f / "case.npz", *cases.phantom(shape, spacing, [7, 1000 + k]))) / "case.npz"
        for s in settings(set(inspect.signature(predict_case).parameters), ctx.quick):
            m = measure.run_child("benchmarks.predict_gpu:measure_setting", kwargs={"model_dir": str(model_dir), "configuration": config,
                                  "device": device, "case": str(case), "setting": s}, threads=ctx.threads, poll_s=None, timeout_s=ctx.timeout,
                                  log_path=ctx.workdir / f"test_{k}_{'_'.join(map(str, s.values()))}.log")
            r = m["value"] or {}
            runs.append({**m, "case": f"test_{k}", "setting": s})
            rows.append({"case": f"test_{k}", **s, "ok": m["ok"], "seconds": r.get("seconds"), "liver Dice": (r.get("dice") or {}).get("liver"),
                         "tumour Dice": (r.get("dice") or {}).get("tumour"), "GPU peak (MiB)": r.get("gpu_peak_mib"),
                         "host peak RSS (MiB)": measure.mib(m["peak_rss"]), "host RSS before the call (MiB)": measure.mib(m["peak_rss_before_call"])})
            ctx.checkpoint({"rows": rows, "runs": runs})
    return {"rows": rows, "runs": runs, "ok": all(r["ok"] for r in runs), "device": torch.cuda.get_device_name() if device == "cuda" else device,
            "configuration": config, "test_shape": list(shape), "training": json.loads((entry / "train.json").read_text())}

