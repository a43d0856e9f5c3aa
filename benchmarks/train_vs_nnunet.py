"""Training iteration and training data loader on the CPU: autoliver against nnU-Net v2's stock trainer.

Both tools preprocess the same raw dataset (the shipped real cases plus, by default, 2 LiTS-size
phantoms) with their own planner, then train at the same patch and batch size (default:
autoliver's CPU plan; nnU-Net's U-Net re-derived for that patch by its own planner function),
with the same torch threads, loader workers, warm-up and timed iterations:

- nnU-Net: ``harness.nnunet_side.probe`` (its stock ``nnUNetTrainer``, device cpu), under its Python;
- autoliver: ``autoliver train ... --epochs 1 + iters / warmup --iters-per-epoch warmup
  --val-iters 0 --no-validation``: the first epoch is the warm-up, iterations/s comes from the
  later epochs' records in log.jsonl; its loader alone is then timed here.

Seconds per iteration include the wait for the next batch (split out beside the step); the
loader alone follows ``harness.loader``'s rule for both. Memory: the training process's own
peak (VmHWM) and the process tree's (loader workers included; nnU-Net's also its validation
loader's).
"""

from __future__ import annotations

import json

from benchmarks.harness import cases, measure, nnunet
from benchmarks.harness.loader import autoliver_loader
from benchmarks.harness.report import compare

RATES = ("iterations per second", "loader alone (samples/s)")


def add_arguments(p) -> None:
    p.add_argument("--configs", nargs="+", choices=sorted(nnunet.DATA_IDENTIFIERS), default=["3d_fullres", "2d"])
    p.add_argument("--patch-3d", type=int, nargs=3, metavar=("Z", "Y", "X"), help="3d_fullres patch (default: autoliver's CPU plan's)")
    p.add_argument("--batch-3d", type=int, help="3d_fullres batch size (default: autoliver's CPU plan's)")
    p.add_argument("--patch-2d", type=int, nargs=2, metavar=("Y", "X"), help="2d patch (default: autoliver's CPU plan's)")
    p.add_argument("--batch-2d", type=int, help="2d batch size (default: autoliver's CPU plan's)")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations; also autoliver's iterations per epoch (default: %(default)s)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations, a multiple of --warmup (default: %(default)s)")
    p.add_argument("--loader-batches", type=int, default=10, help="batches timed for the loader alone (default: %(default)s)")
    p.add_argument("--loader-workers", type=int, default=2, help="loader worker processes in both (default: %(default)s)")
    p.add_argument("--n-phantoms", type=int, default=2, help="LiTS-size phantoms added to the real cases (default: %(default)s)")
    p.add_argument("--phantom-shape", type=int, nargs=3, default=[460, 512, 512], metavar=("Z", "Y", "X"))
    p.add_argument("--phantom-spacing", type=float, nargs=3, default=[1.0, 0.77, 0.77], metavar=("Z", "Y", "X"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset-id", type=int, default=901)
    p.add_argument("--dataset-name", default="LiverBench")


def run(ctx) -> dict:
    a = ctx.args
    if a.iters % a.warmup:
        raise SystemExit("--iters must be a multiple of --warmup (autoliver times whole epochs of --warmup iterations)")
    venv, pre = ctx.nnunet, None
    if ctx.quick:
        ws, name, configs = cases.tiny_workspace(ctx), cases.TINY_DATASET, ["3d_fullres"]
        warmup, iters, loader_batches, workers = 1, 1, 2, 1
    else:
        from autoliver.examples.dataset import DEFAULT_REAL_CASES

        name, configs = f"Dataset{a.dataset_id:03d}_{a.dataset_name}", a.configs
        raw_root, dataset = cases.raw_dataset(ctx, name, DEFAULT_REAL_CASES, a.n_phantoms, a.phantom_shape, a.phantom_spacing, a.seed)
        ws = cases.autoliver_preprocessed(ctx, dataset, configs)
        pre = nnunet.preprocessed(ctx, venv, raw_root, a.dataset_id, name, configs) if venv else None
        warmup, iters, loader_batches, workers = a.warmup, a.iters, a.loader_batches, a.loader_workers
    plans = cases.load_plans(ws, name)
    given = {"3d_fullres": (a.patch_3d, a.batch_3d), "2d": (a.patch_2d, a.batch_2d)}
    rows, runs = [], {}
    for config in configs:
        cfg = plans.configurations[config]
        overrides = {k: v for k, v in cases.TINY[config].items()} if ctx.quick else \
            {"patch": given[config][0] or cfg.patch_size, "batch": given[config][1] or cfg.batch_size}
        setting = f"{config} {'x'.join(map(str, overrides['patch']))} b{overrides['batch']}"
        if not ctx.quick and list(overrides["patch"]) != list(cfg.patch_size):
            ctx.note(f"autoliver {config}: patch {list(overrides['patch'])} differs from its plan's {list(cfg.patch_size)}; its network keeps the plan's strides")
        values, runs[config] = {}, {}
        if venv:
            m = nnunet.run(ctx, venv, "benchmarks.harness.nnunet_side:probe", nnunet.env(preprocessed=pre, results=ctx.path("nnunet_results"),
                           loader_workers=workers), ctx.workdir / f"nnunet_{config}.log",
                           kwargs={"preprocessed": str(pre), "dataset": name, "configuration": config, "patch": list(overrides["patch"]),
                                   "batch": int(overrides["batch"]), "warmup": warmup, "iters": iters, "loader_batches": loader_batches,
                                   "threads": ctx.threads, "loader_workers": workers})
            runs[config]["nnunet"] = m
            values["nnunet"] = _metrics(m, m["value"] or {})
        if ctx.autoliver:
            m, r = autoliver_side(ctx, ws, name, config, overrides, warmup, iters, workers, loader_batches)
            runs[config]["autoliver"] = {**m, "value": r}
            values["autoliver"] = _metrics(m, r)
        rows += compare(values, higher_better=RATES, no_ratio=("CPU share (CPU s / wall s)", "wall time (s)", "CPU time, process tree (s)"),
                        setting=setting)
        ctx.checkpoint({"rows": rows, "runs": runs})
    return {"rows": rows, "runs": runs, "ok": all(m["ok"] for r in runs.values() for m in r.values()),
            "settings": {"warmup": warmup, "iters": iters, "loader_batches": loader_batches, "loader_workers": workers}}


def _metrics(m: dict, r: dict) -> dict:
    net = r.get("network") or {}
    return {"seconds per iteration": r.get("s_per_iter"), "iterations per second": r.get("its_per_s"),
            "train step alone, per iteration (s)": r.get("step_s_per_iter"), "wait for the batch, per iteration (s)": r.get("loader_wait_s_per_iter"),
            "loader alone (samples/s)": r.get("loader_samples_per_s"), **measure.process_metrics(m),
            "network parameters (M)": net["parameters"] / 1e6 if net.get("parameters") else None, "CPU share (CPU s / wall s)": m.get("cpu_share")}


def autoliver_side(ctx, ws, name: str, config: str, overrides: dict, warmup: int, iters: int, workers: int, loader_batches: int):
    """``autoliver train`` in a child process on a scratch copy of the plans, then its loader alone here."""
    scratch = ctx.path(f"autoliver_train_{config}", fresh=True)
    wsx = cases.scratch_workspace(ws, name, scratch / "ws", {config: overrides})
    argv = ["train", "-d", name, config, "0", "--workspace", str(wsx), "--epochs", str(1 + iters // warmup), "--iters-per-epoch", str(warmup),
            "--val-iters", "0", "--no-validation", "--device", "cpu", "-np", str(workers), "--threads", str(ctx.threads), "--no-progress"]
    m = measure.run_child("autoliver.cli:main", argv=argv, threads=ctx.threads, log_path=scratch / "train.log", poll_s=ctx.poll, timeout_s=ctx.timeout)
    records = cases.read_jsonl(wsx / "results" / name / config / "fold_0" / "log.jsonl")
    later = records[1:] or records
    train_s = sum(r["train_s"] for r in later)
    cfg = cases.load_plans(wsx, name).configurations[config]
    r = {"epochs": records, "network": {"parameters": cases.network_parameters(cfg), "features_per_stage": list(cfg.features_per_stage),
                                        "strides": [list(s) for s in cfg.strides]}}
    if train_s and m["ok"]:
        s_per_iter = train_s / sum(x["iters"] for x in later)
        wait = sum(x["data_wait_share"] * x["train_s"] for x in later) / train_s * s_per_iter
        r.update(s_per_iter=s_per_iter, its_per_s=1 / s_per_iter, step_s_per_iter=s_per_iter - wait, loader_wait_s_per_iter=wait,
                 train_samples_per_s=sum(x["samples"] for x in later) / train_s)
    else:
        m["ok"] = False
    from autoliver.preprocess.storage import list_cases

    splits = wsx / "results" / name / "splits.json"
    folder = wsx / "preprocessed" / name / cfg.data_identifier
    train_cases = json.loads(splits.read_text())[0]["train"] if splits.is_file() else list_cases(folder)
    r.update(autoliver_loader(folder, train_cases, cfg, workers, loader_batches))
    return m, r
