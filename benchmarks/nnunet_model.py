"""A model trained by nnU-Net v2, predicted by `nnUNetv2_predict` and by `autoliver predict -m`: label agreement, s/case, peak memory.

The model: nnU-Net's stock ``nnUNetTrainer`` trained by nnU-Net itself
(``harness/nnunet_tiny.py``: a small ``3d_fullres`` U-Net, features ``--features``, patch
32 x 64 x 64, spacing 3 x 1.5 x 1.5 mm, ``--epochs`` x ``--iters`` iterations on the CPU, on
lits117_128cube, totalseg_example_ct_full, totalseg_example_dicom20 and dcmqi_ct3slice),
cached. Without nnU-Net (and with ``--quick``) the committed fixture model
``tests/data/nnunet_tiny/model`` is used and only autoliver runs.

Both tools predict the same folder of real CT cases (``--cases``; ``--quick``: the fixture's
5 mm-slice crop) from an empty output folder, TTA on (``--tta``), each in a fresh process:

    nnUNetv2_predict_from_modelfolder -i IN -o OUT -m MODEL -f 0 -device cpu --disable_progress_bar [-npp N -nps N]
    autoliver predict -i IN -o OUT -m MODEL -f 0 --device cpu --threads T --no-progress [--no-tta]

Measured: seconds per case (wall / cases), CPU time, peak RSS (the main process; the process
tree's sum of RSS and PSS), and per case the agreement of the two label maps: voxels equal
and Dice per class (liver 1, tumour 2; both empty = 1). Goal: >= 99.5 % voxels equal and Dice
>= 0.99 per class present.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from benchmarks.harness import cache, measure, nnunet
from benchmarks.harness.report import compare

FIXTURE = measure.REPO_ROOT / "tests" / "data" / "nnunet_tiny"
CASES = ("chaos_ct_sample", "totalseg_example_dicom20", "lits117_128cube", "totalseg_example_ct_full")


def add_arguments(p) -> None:
    p.add_argument("--cases", nargs="*", default=list(CASES), help="shared real cases to predict (default: %(default)s)")
    p.add_argument("--tta", choices=["on", "off"], default="on")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--features", type=int, nargs="*", default=[4, 8, 16, 32])
    p.add_argument("--nnunet-procs", type=int, help="nnUNetv2_predict -npp and -nps (default: nnU-Net's 3 each)")
    p.add_argument("--model", help="an nnU-Net model folder to use instead of training one")


def _model(ctx, venv) -> Path:
    a = ctx.args
    if a.model:
        return Path(a.model)
    if ctx.quick or venv is None:
        return FIXTURE / "model" / "nnUNetTrainer__nnUNetPlansTiny__3d_fullres"

    def build(folder: Path) -> None:
        kwargs = {"work": str(folder / "work"), "data_dir": str(measure.REPO_ROOT.parent / "shared" / "data" / "nifti"),
                  "epochs": a.epochs, "iters": a.iters, "features": a.features, "threads": ctx.threads}
        m = nnunet.run(ctx, venv, "benchmarks.harness.nnunet_tiny:build_model", nnunet.env(), folder / "train.log", kwargs=kwargs, poll_s=0)
        if not m["ok"]:
            raise SystemExit(f"nnU-Net training failed: {m['error']}; see {folder / 'train.log'}")
        shutil.copytree(m["value"]["model_dir"], folder / "model")

    params = {"epochs": a.epochs, "iters": a.iters, "features": a.features, "threads": ctx.threads}
    return cache.entry(ctx, "nnunet_tiny_model", params, build) / "model"


def _inputs(ctx) -> Path:
    folder = ctx.path("images", fresh=True)
    if ctx.quick:
        shutil.copyfile(FIXTURE / "images" / "aniso_0000.nii.gz", folder / "aniso_0000.nii.gz")
        return folder
    from autoliver import examples

    for name in ctx.args.cases:
        src = Path(examples.__file__).parent / "nifti" / f"{name}_image.nii.gz"
        if not src.is_file():
            src = measure.REPO_ROOT.parent / "shared" / "data" / "nifti" / f"{name}_image.nii.gz"
        shutil.copyfile(src, folder / f"{name}_0000.nii.gz")
    return folder


def agreement(a_dir: Path, b_dir: Path, cases: list[str]) -> dict:
    """Per case: voxels equal and Dice per class of two label folders."""
    from autoliver.io.images import read_image

    out = {}
    for c in cases:
        a, _ = read_image(a_dir / f"{c}.nii.gz")
        b, _ = read_image(b_dir / f"{c}.nii.gz")
        row = {"voxels_equal": float((a == b).mean()), "differing_voxels": int((a != b).sum())}
        for k, name in ((1, "liver"), (2, "tumour")):
            x, y = a == k, b == k
            row[f"{name}_voxels"] = [int(x.sum()), int(y.sum())]
            row[f"{name}_dice"] = 1.0 if not x.any() and not y.any() else float(2 * (x & y).sum() / (x.sum() + y.sum()))
        out[c] = row
    return out


def _measure(m: dict, n: int) -> dict:
    return {"s per case": m["wall_s"] / n, "CPU s per case": m.get("cpu_s", 0.0) / n, "peak RSS MiB": m["peak_rss"] / measure.MIB,
            "tree RSS MiB": (m.get("peak_tree_rss") or 0) / measure.MIB, "tree PSS MiB": (m.get("peak_tree_pss") or 0) / measure.MIB}


def run(ctx) -> dict:
    a = ctx.args
    venv = ctx.nnunet
    model = _model(ctx, venv)
    images = _inputs(ctx)
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in images.glob("*_0000.nii.gz"))
    tta = a.tta == "on"
    values, runs, outs = {}, {}, {}
    if venv is not None:
        out = ctx.path("nnunet_out", fresh=True)
        argv = ["-i", str(images), "-o", str(out), "-m", str(model), "-f", "0", "-device", "cpu", "--disable_progress_bar",
                *([] if tta else ["--disable_tta"]), *(["-npp", str(a.nnunet_procs), "-nps", str(a.nnunet_procs)] if a.nnunet_procs else [])]
        m = nnunet.run(ctx, venv, "nnunetv2.inference.predict_from_raw_data:predict_entry_point_modelfolder", nnunet.env(),
                       ctx.workdir / "nnunet_predict.log", argv=argv)
        runs["nnunet"] = {"argv": ["nnUNetv2_predict_from_modelfolder", *argv], **m}
        if m["ok"]:
            values["nnunet"], outs["nnunet"] = _measure(m, len(cases)), out
    if ctx.autoliver:
        out = ctx.path("autoliver_out", fresh=True)
        argv = ["predict", "-i", str(images), "-o", str(out), "-m", str(model), "-f", "0", "--device", "cpu",
                "--threads", str(ctx.threads), "--no-progress", *([] if tta else ["--no-tta"])]
        m = measure.run_child("autoliver.cli:main", argv=argv, threads=ctx.threads, log_path=ctx.workdir / "autoliver_predict.log",
                              poll_s=ctx.poll, timeout_s=ctx.timeout)
        runs["autoliver"] = {"argv": ["autoliver", *argv], **m}
        if not m["ok"]:
            raise SystemExit(f"autoliver predict failed: {m['error']}; see {ctx.workdir / 'autoliver_predict.log'}")
        values["autoliver"], outs["autoliver"] = _measure(m, len(cases)), out
    rows = compare(values, group="prediction")
    result = {"rows": rows, "model": str(model), "cases": cases, "tta": tta, "runs": runs}
    if len(outs) == 2:
        agree = agreement(outs["autoliver"], outs["nnunet"], cases)
        result["agreement"] = agree
        for c, r in agree.items():
            rows.append({"group": "agreement", "metric": c, "autoliver": round(100 * r["voxels_equal"], 4),
                         "nnunet": f"liver Dice {r['liver_dice']:.4f}, tumour Dice {r['tumour_dice']:.4f}"})
        ok = all(r["voxels_equal"] >= 0.995 and all(r[f"{k}_dice"] >= 0.99 for k in ("liver", "tumour")) for r in agree.values())
        ctx.note(f"agreement goal (>= 99.5 % voxels, Dice >= 0.99 per class) {'met' if ok else 'NOT met'} on every case")
    elif ctx.quick:
        ref = FIXTURE / "expected"
        result["agreement_with_fixture"] = agreement(outs["autoliver"], ref, cases)
    return result
