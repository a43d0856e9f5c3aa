"""Prediction on a GPU: seconds per LiTS-size case, GPU and host peak memory, and Dice, for
the precisions, test-time augmentation on/off and ROI-first on/off.

Self-contained, in memory (no image files: it runs where only torch, numpy and SciPy are
installed and blosc2 is carried): it makes synthetic phantoms with ``autoliver.examples.phantom``,
fingerprints and plans them with ``planning`` for the GPU's memory, preprocesses them with
``autoliver.preprocess`` into a temporary workspace, trains one configuration on every case
with ``api.train`` for ``--train-minutes``, then predicts ``--test-cases`` LiTS-size phantoms
(``--slices`` x 512 x 512 at 1.0 x 0.77 x 0.77 mm) with ``predict_case`` in each setting.
Seconds per case cover preprocessing, network and export to the input grid (file reading and
writing are not included). Writes a JSON and prints a table.

    python benchmarks/bench_predict_gpu.py --out gpu.json --train-minutes 4 --configuration 3d_fullres
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from autoliver import api
from autoliver.core.layout import Workspace
from autoliver.evaluate.overlap import case_dice
from autoliver.examples.dataset import phantom_geometry
from autoliver.examples.phantom import make_phantom
from autoliver.infer.pipeline import predict_case
from autoliver.infer.predictor import load_model
from autoliver.io.atomic import write_json
from autoliver.preprocess.case import iter_preprocessed
from autoliver.preprocess.runner import DATASET_PROPERTIES, case_seed
from autoliver.preprocess.storage import save_case
from autoliver.train.options import TrainOptions
from planning.fingerprint import analyse_case, reduce_fingerprint
from planning.planner import plan_experiment

log = logging.getLogger("bench_predict_gpu")
DATASET = "Dataset950_GpuBench"
LITS_SPACING = (1.0, 0.77, 0.77)


def phantom_case(shape, spacing, seed: int, n_tumours: int = 3):
    image, label = make_phantom(tuple(shape), tuple(spacing), np.random.default_rng([7, seed]), n_tumours=n_tumours)
    return image, label.astype(np.uint8), phantom_geometry(image.shape, spacing)


def build_workspace(root: Path, n_train: int, train_shape, train_spacing, memory_gb: float) -> Workspace:
    """Fingerprint, plan and preprocess ``n_train`` phantoms in memory into a workspace."""
    ws = Workspace(root)
    cases = {f"phantom_{k:03d}": phantom_case(train_shape, train_spacing, k) for k in range(n_train)}
    analysed = {cid: analyse_case(img, lab, geo.spacing, geo.direction, np.random.default_rng(k))
                for k, (cid, (img, lab, geo)) in enumerate(cases.items())}
    dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2}, "numTraining": n_train, "file_ending": ".nii.gz"}
    fp = reduce_fingerprint(analysed, dataset_json, DATASET, "in-memory")
    plans = plan_experiment(fp, memory_gb=memory_gb)
    pre = ws.preprocessed(DATASET)
    api.write_plans(plans, pre / "plans.json")
    idents = sorted(plans.data_spacings)
    for cid, (img, lab, geo) in cases.items():
        for ident, data, seg, props in iter_preprocessed(img, geo, lab, plans, idents, seed=case_seed(cid)):
            props["plans_hash"] = plans.plans_hash
            save_case(pre / ident, cid, data, seg, props)
    for ident in idents:
        write_json(pre / ident / DATASET_PROPERTIES, {"dataset_name": DATASET, "plans_hash": plans.plans_hash, "data_identifier": ident,
                                                      "spacing": list(plans.data_spacings[ident]), "normalisation": plans.to_json()["normalisation"],
                                                      "cases": sorted(cases)})
    return ws


def measure(model, image, geometry, label, **kwargs) -> dict:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    pred = predict_case(model, image, geometry, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = {"seconds": round(seconds, 3), "timings": {k: round(v, 3) for k, v in pred.timings.items()}, "dice": case_dice(pred.seg, label)}
    if torch.cuda.is_available():
        out["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    out["host_peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    return out


def settings(supported: set[str]) -> list[dict]:
    """The prediction settings to compare (only the keywords predict_case accepts)."""
    grid = [{"tta": True}, {"tta": False}]
    if "precision" in supported:
        grid = [dict(g, precision=p) for g in grid for p in ("fp32", "fp16", "bf16")]
    if "roi" in supported:
        grid = [dict(g, roi=r) for g in grid for r in (True, False)]
    return grid


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configuration", default="3d_fullres")
    p.add_argument("--train-minutes", type=float, default=4.0)
    p.add_argument("--n-train", type=int, default=6)
    p.add_argument("--train-shape", type=int, nargs=3, default=[200, 384, 384])
    p.add_argument("--train-spacing", type=float, nargs=3, default=list(LITS_SPACING))
    p.add_argument("--slices", type=int, default=450)
    p.add_argument("--test-cases", type=int, default=2)
    p.add_argument("--gpu-memory", type=float, default=8.0, help="plan for this GPU memory in GB (default: nnU-Net's 8)")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    root = args.workdir or Path(tempfile.mkdtemp(prefix="gpubench_"))
    t0 = time.perf_counter()
    ws = build_workspace(root, args.n_train, args.train_shape, args.train_spacing, args.gpu_memory)
    t_prep = time.perf_counter() - t0
    result = api.train(DATASET, args.configuration, "all", ws, TrainOptions(budget_minutes=args.train_minutes, device=device, progress=False, n_workers=4))
    model = load_model(ws.results(DATASET), args.configuration, ["all"], device)
    import inspect

    supported = set(inspect.signature(predict_case).parameters)
    runs = []
    for k in range(args.test_cases):
        image, label, geometry = phantom_case((args.slices, 512, 512), LITS_SPACING, 1000 + k)
        measure(model, image, geometry, label, tta=False)  # warm-up (cudnn autotune, allocator)
        for s in settings(supported):
            r = measure(model, image, geometry, label, **s)
            r.update(case=f"test_{k}", shape=list(image.shape), **s)
            runs.append(r)
            log.info("%s", r)
            write_json(args.out, {"partial": True, "runs": runs})  # kept if the run is cut short
    out = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        "torch": torch.__version__, "configuration": args.configuration, "patch": list(model.configuration.patch_size),
        "batch_size": model.configuration.batch_size, "epochs": result.epochs, "train_minutes": args.train_minutes,
        "prep_seconds": round(t_prep, 1), "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    keys = [k for k in ("precision", "tta", "roi") if k in runs[0]]
    print(" | ".join(keys + ["case", "seconds", "liver Dice", "tumour Dice", "GPU GiB"]))
    for r in runs:
        print(" | ".join([str(r[k]) for k in keys] + [r["case"], f"{r['seconds']:.2f}", f"{r['dice']['liver']:.4f}", f"{r['dice']['tumour']:.4f}", str(r.get("gpu_peak_gib"))]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
