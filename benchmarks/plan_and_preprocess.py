"""Fingerprint + experiment planning + preprocessing: `autoliver plan_and_preprocess` against `nnUNetv2_plan_and_preprocess`.

Both run on the same raw dataset (the real CT cases shipped in ``autoliver.examples`` plus
LiTS-size phantoms, 460 x 512 x 512 at 1.0 x 0.77 x 0.77 mm by default), with the same number
of worker processes (``-np``; nnU-Net also ``-npfp``), each from an empty output folder:

    nnUNetv2_plan_and_preprocess -d 901 -c 2d 3d_fullres 3d_lowres -np N -npfp N --verify_dataset_integrity
    autoliver plan_and_preprocess RAW/Dataset901_LiverBench --workspace WS -np N

Measured: wall and CPU time, peak memory (main process, process tree sum of RSS and PSS,
largest single process), and the disk footprint of the preprocessed output.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

from benchmarks.harness import cases, measure, nnunet
from benchmarks.harness.report import compare

NNUNET_CONFIGS = ("2d", "3d_fullres", "3d_lowres")


def add_arguments(p) -> None:
    p.add_argument("-np", "--n-proc", type=int, default=2, help="worker processes of both tools (default: %(default)s)")
    p.add_argument("--n-phantoms", type=int, default=3, help="LiTS-size phantoms added to the real cases (default: %(default)s)")
    p.add_argument("--phantom-shape", type=int, nargs=3, default=[460, 512, 512], metavar=("Z", "Y", "X"))
    p.add_argument("--phantom-spacing", type=float, nargs=3, default=[1.0, 0.77, 0.77], metavar=("Z", "Y", "X"))
    p.add_argument("--seed", type=int, default=0, help="phantom seed (default: %(default)s)")
    p.add_argument("--dataset-id", type=int, default=901)
    p.add_argument("--dataset-name", default="LiverBench")
    p.add_argument("--autoliver-args", default="", help="extra arguments for `autoliver plan_and_preprocess`")
    p.add_argument("--keep", action="store_true", help="keep the preprocessed outputs (default: deleted after measuring)")


def run(ctx) -> dict:
    a = ctx.args
    name = f"Dataset{a.dataset_id:03d}_{a.dataset_name}"
    raw_root, dataset = cases.raw_dataset(
        ctx, name, ctx.pick(_real(), ()),
        ctx.pick(a.n_phantoms, 2), ctx.pick(a.phantom_shape, [24, 48, 48]), ctx.pick(a.phantom_spacing, [8.0, 8.0, 8.0]), a.seed)
    n_proc = ctx.pick(a.n_proc, 1)
    values, runs = {}, {}
    venv = ctx.nnunet
    if venv:
        pre = ctx.path("nnunet_preprocessed", fresh=True)
        runs["nnunet"] = m = nnunet.run(ctx, venv, "plan_and_preprocess", nnunet.env(raw_root, pre, ctx.path("nnunet_results")),
                                        ctx.workdir / "nnunet.log", argv=["-d", str(a.dataset_id), "-c", *NNUNET_CONFIGS, "-np", str(n_proc),
                                                                           "-npfp", str(n_proc), "--verify_dataset_integrity"])
        m["output"] = str(pre / name)
    if ctx.autoliver:
        ws = ctx.path("autoliver_workspace", fresh=True)
        argv = ["plan_and_preprocess", str(dataset), "--workspace", str(ws), "-np", str(n_proc), "--no-progress", *shlex.split(a.autoliver_args)]
        runs["autoliver"] = m = measure.run_child("autoliver.cli:main", argv=argv, threads=ctx.threads, log_path=ctx.workdir / "autoliver.log",
                                                  poll_s=ctx.poll, timeout_s=ctx.timeout)
        m["output"] = str(ws / "preprocessed" / name)
    for tool, m in runs.items():
        out = Path(m["output"])
        m["disk_bytes"] = measure.disk_usage(out) if out.exists() else 0
        m["disk_by_child"] = {c.name: measure.disk_usage(c) for c in sorted(out.iterdir())} if out.is_dir() else {}
        values[tool] = {**measure.process_metrics(m), "max processes": m.get("max_processes"),
                        "disk, preprocessed output (MiB)": measure.mib(m["disk_bytes"])}
    if not a.keep:
        for sub in ("nnunet_preprocessed", "autoliver_workspace"):
            shutil.rmtree(ctx.workdir / sub, ignore_errors=True)
    return {"rows": compare(values, no_ratio=("max processes",)), "runs": runs, "ok": all(m["ok"] for m in runs.values()),
            "dataset": {"name": name, "cases": cases.describe(dataset / "imagesTr"), "raw_bytes": measure.disk_usage(dataset)},
            "nnunet_configurations": list(NNUNET_CONFIGS)}


def _real():
    from autoliver.examples.dataset import DEFAULT_REAL_CASES

    return DEFAULT_REAL_CASES
