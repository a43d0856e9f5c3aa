"""nnU-Net v2's training step and training data loader on the CPU, at a forced patch and batch size.

Runs with the Python of nnU-Net's own virtual environment (it imports nnunetv2 and torch, never
autoliver). ``bench_train_vs_nnunet.py`` starts it as a subprocess and measures its process tree.

It builds nnU-Net's stock ``nnUNetTrainer`` for one configuration of an already preprocessed
dataset (``nnUNetv2_plan_and_preprocess``), with the plan's patch and batch size replaced by the
requested ones and the network topology re-derived for that patch exactly as nnU-Net's
experiment planner derives it (``get_pool_and_conv_props``, 32 base features capped at 320 in 3D
and 512 in 2D, two convolutions per stage). The plans are changed in memory only. Then:

1. ``initialize()`` and ``on_train_start()`` (this starts nnU-Net's multi-process loaders,
   ``nnUNet_n_proc_DA`` workers) and ``on_train_epoch_start()``;
2. W warm-up iterations, then N timed iterations of ``train_step(next(dataloader_train))``:
   seconds per iteration with the wait for the batch included, and the train step alone;
3. the training loader alone: every batch its workers may have cached meanwhile is taken, then
   K batches are timed as they are produced (samples/s);
4. ``on_train_end()`` shuts the loaders down.

Everything is bounded by ``--timeout`` (SIGALRM; the loaders are shut down on the way out).
The results go to ``--out`` as JSON.

    /path/to/nnunet-venv/bin/python benchmarks/nnunet_train_probe.py --preprocessed P --results R \
        --dataset Dataset901_LiverBench --configuration 3d_fullres --patch 64 128 128 --batch 2 --out probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import time
from copy import deepcopy
from pathlib import Path

MAX_FEATURES = {2: 512, 3: 320}  # nnU-Net ExperimentPlanner: UNet_max_features_2d / _3d
BASE_FEATURES = 32  # UNet_base_num_features
MIN_FEATURE_MAP_EDGE = 4  # UNet_featuremap_min_edge_length
CONVS_PER_STAGE = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preprocessed", type=Path, required=True, help="nnUNet_preprocessed folder")
    p.add_argument("--results", type=Path, required=True, help="nnUNet_results folder (the trainer writes its log there)")
    p.add_argument("--dataset", required=True, help="DatasetNNN_Name")
    p.add_argument("--configuration", default="3d_fullres")
    p.add_argument("--plans", default="nnUNetPlans", help="plans identifier (default: %(default)s)")
    p.add_argument("--patch", type=int, nargs="+", required=True, help="patch size (Z Y X in 3D, Y X in 2D)")
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first (default: %(default)s)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations (default: %(default)s)")
    p.add_argument("--loader-batches", type=int, default=10, help="batches timed for the loader alone (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: %(default)s)")
    p.add_argument("--loader-workers", type=int, default=2, help="nnUNet_n_proc_DA: loader processes (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=1800, help="give up after this many seconds (default: %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="results JSON")
    a = p.parse_args(argv)
    if a.batch < 1 or a.iters < 1 or a.warmup < 0 or a.loader_batches < 1 or a.threads < 1 or a.loader_workers < 0:
        p.error("--batch, --iters, --loader-batches, --threads must be >= 1; --warmup, --loader-workers >= 0")
    return a


def force_patch_and_batch(plans: dict, configuration: str, patch: list[int], batch: int) -> dict:
    """A copy of nnU-Net's plans whose ``configuration`` trains at ``patch`` and ``batch``.

    The U-Net topology (stages, strides, kernel sizes, features) is re-derived for the patch
    with nnU-Net's own planner function, as its planner would for a patch of that size.
    """
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    plans = deepcopy(plans)
    conf = plans["configurations"][configuration]
    if "inherits_from" in conf:
        parent = plans["configurations"][conf["inherits_from"]]
        conf = {**deepcopy(parent), **conf}
        del conf["inherits_from"]
        plans["configurations"][configuration] = conf
    spacing = conf["spacing"]
    if len(patch) != len(spacing):
        raise SystemExit(f"--patch has {len(patch)} values but {configuration} is {len(spacing)}D")
    _, strides, kernels, padded, _ = get_pool_and_conv_props(spacing, patch, MIN_FEATURE_MAP_EDGE, 999999)
    if [int(v) for v in padded] != list(patch):
        raise SystemExit(f"patch {patch} is not divisible by nnU-Net's pooling for it; nnU-Net would pad it to {list(padded)}")
    n_stages = len(strides)
    dims = len(spacing)
    arch = conf["architecture"]["arch_kwargs"]
    arch.update(
        n_stages=n_stages,
        features_per_stage=[min(MAX_FEATURES[dims], BASE_FEATURES * 2**i) for i in range(n_stages)],
        kernel_sizes=[list(k) for k in kernels],
        strides=[list(s) for s in strides],
        n_conv_per_stage=[CONVS_PER_STAGE] * n_stages,
        n_conv_per_stage_decoder=[CONVS_PER_STAGE] * (n_stages - 1),
    )
    conf["patch_size"] = list(patch)
    conf["batch_size"] = batch
    return plans


class Timeout(Exception):
    pass


def _alarm(signum, frame):  # noqa: ARG001
    raise Timeout()


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    base = args.preprocessed / args.dataset
    plans = force_patch_and_batch(load_json(str(base / f"{args.plans}.json")), args.configuration, args.patch, args.batch)
    plans["continue_training"] = False  # what nnUNetv2_train adds before building the trainer
    dataset_json = load_json(str(base / "dataset.json"))
    arch = plans["configurations"][args.configuration]["architecture"]["arch_kwargs"]
    out: dict = {
        "tool": "nnunet", "configuration": args.configuration, "patch_size": list(args.patch), "batch_size": args.batch,
        "threads": args.threads, "loader_workers": args.loader_workers, "warmup": args.warmup, "iters": args.iters,
        "network": {k: arch[k] for k in ("n_stages", "features_per_stage", "kernel_sizes", "strides")},
    }

    t0 = time.perf_counter()
    trainer = nnUNetTrainer(plans=plans, configuration=args.configuration, fold=args.fold, dataset_json=dataset_json,
                            device=torch.device("cpu"))
    trainer.initialize()
    out["network"]["parameters"] = int(sum(p.numel() for p in trainer.network.parameters()))
    started = False
    try:
        trainer.on_train_start()
        started = True
        trainer.on_train_epoch_start()
        out["setup_s"] = time.perf_counter() - t0
        out["rss_after_setup_bytes"] = _max_rss_bytes()
        dl = trainer.dataloader_train

        wait, step, losses = [], [], []
        for i in range(args.warmup + args.iters):
            if i == args.warmup:
                cpu0 = time.process_time()
            t1 = time.perf_counter()
            batch = next(dl)
            t2 = time.perf_counter()
            losses.append(float(trainer.train_step(batch)["loss"]))
            t3 = time.perf_counter()
            if i >= args.warmup:
                wait.append(t2 - t1)
                step.append(t3 - t2)
        cpu = time.process_time() - cpu0
        total = sum(wait) + sum(step)
        out.update(
            s_per_iter=total / args.iters, its_per_s=args.iters / total, step_s_per_iter=sum(step) / args.iters,
            loader_wait_s_per_iter=sum(wait) / args.iters, main_cpu_s_per_iter=cpu / args.iters,
            train_samples_per_s=args.iters * args.batch / total, step_s=step, wait_s=wait, losses=losses,
        )

        # the loader alone: first take every batch its workers could have cached while the network trained
        # (nnU-Net's queue of num_cached, the thread queue behind it of num_cached, one batch held by that
        # thread and one by each worker), then time K batches as they are produced
        n_cached = getattr(dl, "num_cached", 6)
        drain = 2 * n_cached + args.loader_workers + 2 if args.loader_workers else 0
        pulls = []
        for _ in range(drain + args.loader_batches):
            t1 = time.perf_counter()
            b = next(dl)
            pulls.append(time.perf_counter() - t1)
        t_load = sum(pulls[drain:])
        out.update(loader_batches=args.loader_batches, loader_drained=drain, loader_s=t_load,
                   loader_samples_per_s=args.loader_batches * args.batch / t_load, loader_pull_s=pulls,
                   batch_data_shape=list(b["data"].shape), batch_data_dtype=str(b["data"].dtype))
        out["main_max_rss_bytes"] = _max_rss_bytes()
        out["versions"] = {"torch": torch.__version__, "numpy": np.__version__}
        return out
    finally:
        signal.alarm(0)
        if started:
            end_training(trainer)


def end_training(trainer) -> None:
    """``on_train_end`` (writes checkpoint_final.pth, shuts the loaders down); if it fails, stop
    the loaders directly so no worker process is left behind."""
    try:
        trainer.on_train_end()
    except Exception as exc:  # noqa: BLE001 - shut the loaders down whatever happened
        print(f"on_train_end failed ({exc!r}); stopping the loaders directly", file=sys.stderr)
        for dl in (trainer.dataloader_train, trainer.dataloader_val):
            if hasattr(dl, "_finish"):
                dl._finish()


def prepare_process(args: argparse.Namespace) -> None:
    """nnunetv2 reads its folders and loader process count from the environment at import
    time: set them, and arm the --timeout alarm."""
    os.environ["nnUNet_preprocessed"] = str(args.preprocessed.resolve())
    os.environ["nnUNet_results"] = str(args.results.resolve())
    os.environ.setdefault("nnUNet_raw", str(args.results.resolve()))
    os.environ["nnUNet_n_proc_DA"] = str(args.loader_workers)
    os.environ["nnUNet_compile"] = "false"
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(max(1, int(args.timeout)))


def run_and_report(args: argparse.Namespace, run_fn) -> int:
    """Run ``run_fn(args)`` under the timeout and write its result (or the error) to ``--out``
    as JSON for the driver; exit status 0 when ``ok``."""
    prepare_process(args)
    t0 = time.perf_counter()
    try:
        out = run_fn(args)
        out.setdefault("ok", True)
    except Timeout:
        out = {"tool": "nnunet", "ok": False, "error": f"timed out after {args.timeout:.0f} s"}
    except Exception as exc:  # noqa: BLE001 - reported in the JSON for the driver
        import traceback

        traceback.print_exc()
        out = {"tool": "nnunet", "ok": False, "error": repr(exc)}
    out["wall_s"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0 if out["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    return run_and_report(parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
