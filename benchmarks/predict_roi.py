"""ROI-first inference and inference tiles, each setting against the classic window: seconds per case and Dice; peak memory of `autoliver predict`.

For each case (the real CT cases shipped in ``autoliver.examples`` and LiTS-size phantoms,
512 x 512 x ``--slices`` at 1.0 x 0.77 x 0.77 mm, seeds unlike the training phantoms') and each
configuration of the model (``-m``), ``predict_case`` runs once per ``--variants`` setting
(``ROI/TILES``: ROI off, on or auto; tiles patch or auto; default: the classic ``off/patch``,
``on/patch``, ``off/auto`` and ``auto/auto``; TTA on unless ``--no-tta``, step 0.5) in this
process, and the labels are scored against the reference (liver = labels 1 + 2, tumour =
label 2, LiTS rule for empty masks) and compared voxel by voxel with the first setting's.
With ``--memory``, each configuration also predicts a 512 x 512 x ``--memory-slices`` phantom
through ``autoliver predict`` (its defaults; plain and with --save-probabilities), each in its
own measured process. Timings are wall-clock on this machine with whatever else runs on it:
note the load.
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks.harness import cache, cases, measure

REAL_CASES = ("lits117_128cube", "chaos_ct_sample", "totalseg_example_ct_sm")
VARIANTS = ("off/patch", "on/patch", "off/auto", "auto/auto")


def add_arguments(p) -> None:
    p.add_argument("-m", "--model-dir", type=str, help="trained model folder, results/<dataset> (required unless --quick)")
    p.add_argument("-c", "--configurations", nargs="+", default=["2d", "3d_fullres"])
    p.add_argument("--real", nargs="*", default=list(REAL_CASES))
    p.add_argument("--phantoms", type=int, default=1)
    p.add_argument("--slices", type=int, default=400)
    p.add_argument("--memory", action="store_true", help="also the peak memory of `autoliver predict` on a large phantom")
    p.add_argument("--memory-slices", type=int, default=600)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--no-tta", action="store_true", help="mirroring TTA off (default: on)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="ROI/TILES",
                   help="settings to compare, the first is the reference (default: %(default)s)")


def parse_variant(text: str) -> tuple[str, str]:
    roi, _, tiles = text.partition("/")
    if roi not in ("auto", "on", "off") or tiles not in ("auto", "patch"):
        raise SystemExit(f"--variants: {text!r} is not ROI/TILES with ROI auto|on|off and TILES auto|patch")
    return roi, tiles


def timed_prediction(model, image, label, geometry, roi: str, tta: bool, tiles: str = "patch") -> dict:
    import torch

    from autoliver.evaluate.overlap import case_dice
    from autoliver.infer.pipeline import predict_case

    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    sync()
    t0 = time.perf_counter()
    pred = predict_case(model, image, geometry, tta=tta, step=0.5, roi=roi, tiles=tiles)
    sync()
    return {"seconds": time.perf_counter() - t0, "timings": pred.timings, "dice": case_dice(pred.seg, label), "roi": pred.info["roi"],
            "tiles": pred.info["tiles"], "seg": pred.seg}


def run(ctx) -> dict:
    from autoliver.infer.pipeline import predict_case
    from autoliver.infer.predictor import load_model
    from autoliver.io.images import Geometry

    a = ctx.args
    if not (ctx.quick or a.model_dir):
        raise SystemExit("predict_roi needs -m MODEL_DIR (a trained results/<dataset> folder), or --quick")
    model_dir = cases.tiny_model(ctx) if ctx.quick else a.model_dir
    tta = not a.no_tta
    variants = [v for v in a.variants if parse_variant(v)]
    inplane, spacing = ctx.pick((512, 512), (96, 96)), ctx.pick(cases.LITS_SPACING, (4.0, 3.0, 3.0))
    data = {n: cases.real_case(n, ctx) for n in ctx.pick(a.real, ["lits117_128cube"])}
    for k in range(ctx.pick(a.phantoms, 1)):
        data[f"lits_phantom_{k}"] = cases.phantom((ctx.pick(a.slices, 40), *inplane), spacing, 1000 + k)
    rows, per_case = [], {}
    for config in ctx.pick(a.configurations, ["2d"]):
        model = load_model(model_dir, config, device=a.device, precision=a.precision)
        if a.device == "cuda":  # warm-up (kernels, allocator)
            image, _, g = next(iter(data.values()))
            predict_case(model, image[:64, :128, :128].copy(), Geometry(image[:64, :128, :128].shape, g.spacing, g.origin, g.direction), tta=False, roi=False)
        for name, (image, label, geometry) in data.items():
            runs = {v: timed_prediction(model, image, label, geometry, parse_variant(v)[0], tta, parse_variant(v)[1]) for v in variants}
            first = runs[variants[0]]["seg"]
            for v, r in runs.items():
                seg = r.pop("seg")
                roi = r["roi"] or {}
                rows.append({"configuration": config, "case": name, "ROI/tiles": v, "seconds": r["seconds"],
                             "speed-up": runs[variants[0]]["seconds"] / r["seconds"],
                             "ROI % of the grid": 100 * roi.get("fraction", 1.0) if roi.get("used") else None,
                             "tile": "x".join(map(str, r["tiles"]["tile"])), "liver Dice": r["dice"]["liver"], "tumour Dice": r["dice"]["tumour"],
                             f"voxels equal to {variants[0]}": float(np.mean(seg == first))})
            per_case.setdefault(config, {})[name] = {"shape": list(geometry.shape), "runs": runs}
            ctx.checkpoint({"rows": rows, "cases": per_case})
    out = {"rows": rows, "cases": per_case, "settings": {"tta": tta, "step": 0.5, "precision": a.precision, "device": a.device, "variants": variants}}
    if a.memory:
        out["memory"] = memory_runs(ctx, model_dir, ctx.pick(a.configurations, ["2d"]), ctx.pick(a.memory_slices, 40), inplane, spacing, tta)
        rows += [{"table": "peak memory of autoliver predict, each in its own process", **r} for r in out["memory"]]
        out["ok"] = all(r["ok"] for r in out["memory"])
    return out


def memory_runs(ctx, model_dir, configs, slices: int, inplane, spacing, tta: bool) -> list[dict]:
    """Peak memory of `autoliver predict` (ROI on) on one phantom, each setting in a fresh process."""
    from autoliver.io.images import write_image

    src = cache.entry(ctx, "nifti_phantom", {"shape": [slices, *inplane], "spacing": list(spacing), "seed": 7},
                      lambda f: write_image(f / "big_0000.nii", *cases.phantom((slices, *inplane), spacing, 7)[::2])) / "big_0000.nii"
    rows = []
    for config in configs:
        for extra in ([], ["--save-probabilities"]):
            out = ctx.path(f"memory_{config}_{len(extra)}", fresh=True)
            argv = ["predict", "-i", str(src), "-o", str(out), "-m", str(model_dir), "-c", config, "--device", "cpu", "--no-progress",
                    "--threads", str(ctx.threads), *([] if tta else ["--no-tta"]), *extra]
            m = measure.run_child("autoliver.cli:main", argv=argv, threads=ctx.threads, log_path=out / "predict.log", poll_s=ctx.poll, timeout_s=ctx.timeout)
            rows.append({"configuration": config, "case": f"memory: {'x'.join(map(str, (slices, *inplane)))}{' +probabilities' if extra else ''}",
                         "ok": m["ok"], **{k: v for k, v in measure.process_metrics(m).items() if "CPU" not in k}})
    return rows
