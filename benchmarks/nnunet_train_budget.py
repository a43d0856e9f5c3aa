"""Train nnU-Net v2's stock ``nnUNetTrainer`` on the CPU for a wall-clock budget, at a forced patch and batch.

Runs with the Python of nnU-Net's own virtual environment (it imports nnunetv2 and torch, never
autoliver). ``bench_predict_vs_nnunet.py`` starts it as a subprocess, then predicts with
``nnUNetv2_predict -p PLANS_OUT -c CONFIG -f FOLD`` from the model this writes.

1. The plans: ``PLANS_IN.json`` of the preprocessed dataset with ``CONFIG``'s patch and batch
   replaced and its U-Net topology re-derived for that patch by nnU-Net's own planner function
   (``nnunet_train_probe.force_patch_and_batch``), saved as ``PLANS_OUT.json`` next to it with
   ``plans_name`` = PLANS_OUT. The configuration keeps its data identifier, so it trains on the
   data ``nnUNetv2_plan_and_preprocess`` wrote. The trainer copies these plans into its results
   folder ``nnUNetTrainer__PLANS_OUT__CONFIG``, so prediction builds the network it trained.
2. The stock trainer (device cpu, ``nnUNet_n_proc_DA`` loader workers, torch.compile off) runs
   the loop of ``nnUNetTrainer.run_training`` (train steps, validation steps, epoch hooks,
   checkpoints) with its epoch count fitted to the budget the way autoliver's ``--budget-minutes``
   fits its own: iterations 2..6 of the first epoch are timed; when the budget holds fewer than
   ``--min-epochs`` stock epochs (250 training + 50 validation iterations) at that speed, both
   counts are shortened by the same factor so that ``--min-epochs`` epochs fit; after every
   epoch the epoch count is re-estimated from the mean epoch time so far and the poly learning
   rate schedule (``lr_scheduler.max_steps``) follows it, so it decays to ~0 as the budget ends.
   ``--reserve`` of the budget is kept back, as autoliver keeps it; the budget counts the
   epochs only (not the start-up), as autoliver's does.
3. ``on_train_end()`` writes ``checkpoint_final.pth`` and stops the loaders. The final
   validation of ``nnUNetv2_train`` (predicting every validation case) is skipped.

Everything is bounded by ``--timeout`` (SIGALRM). The results go to ``--out`` as JSON.

    /path/to/nnunet-venv/bin/python benchmarks/nnunet_train_budget.py --preprocessed P --results R \
        --dataset Dataset902_LiverPredBench --configuration 2d --patch 256 256 --batch 8 --fold all \
        --minutes 10 --out train.json
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nnunet_train_probe import _max_rss_bytes, end_training, force_patch_and_batch, run_and_report  # noqa: E402

PROBE_ITERS = (2, 7)  # iterations [2, 7) of the first epoch are timed, as autoliver's budget does
VAL_COST = 0.35  # one validation batch (forward only) in training iterations, as autoliver's budget assumes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preprocessed", type=Path, required=True, help="nnUNet_preprocessed folder")
    p.add_argument("--results", type=Path, required=True, help="nnUNet_results folder")
    p.add_argument("--dataset", required=True, help="DatasetNNN_Name")
    p.add_argument("--configuration", default="2d")
    p.add_argument("--plans-in", default="nnUNetPlans", help="plans identifier to start from (default: %(default)s)")
    p.add_argument("--plans-out", default="nnUNetPlansBench", help="identifier of the patched plans (default: %(default)s)")
    p.add_argument("--patch", type=int, nargs="+", required=True, help="patch size (Y X in 2D, Z Y X in 3D)")
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--fold", default="all", help="0..4 or all (default: %(default)s)")
    p.add_argument("--minutes", type=float, required=True, help="wall-clock budget of the epochs")
    p.add_argument("--reserve", type=float, default=0.1, help="share of the budget kept back (default: %(default)s)")
    p.add_argument("--min-epochs", type=int, default=10, help="epochs the schedule gets at least (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: %(default)s)")
    p.add_argument("--loader-workers", type=int, default=2, help="nnUNet_n_proc_DA (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=7200, help="give up after this many seconds (default: %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="results JSON")
    a = p.parse_args(argv)
    if a.batch < 1 or a.threads < 1 or a.loader_workers < 0 or a.min_epochs < 1 or not a.minutes > 0 or not 0 <= a.reserve < 1:
        p.error("--batch, --threads, --min-epochs >= 1; --loader-workers >= 0; --minutes > 0; 0 <= --reserve < 1")
    if a.fold != "all" and not a.fold.isdigit():
        p.error(f"--fold must be a number or 'all', got {a.fold!r}")
    return a


def fit_epoch(iters: int, val_iters: int, s_per_iter: float, training_s: float, min_epochs: int) -> tuple[int, int]:
    """(iterations, validation iterations) per epoch so that ``min_epochs`` epochs fit ``training_s``."""
    epoch_s = s_per_iter * (iters + val_iters * VAL_COST)
    if epoch_s <= 0 or training_s / epoch_s >= min_epochs:
        return iters, val_iters
    factor = training_s / epoch_s / min_epochs
    return max(1, int(iters * factor)), max(1, int(val_iters * factor)) if val_iters else 0


def write_plans(base: Path, args: argparse.Namespace) -> dict:
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

    plans = force_patch_and_batch(load_json(str(base / f"{args.plans_in}.json")), args.configuration, args.patch, args.batch)
    plans["plans_name"] = args.plans_out
    save_json(plans, str(base / f"{args.plans_out}.json"), sort_keys=False)
    return plans


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    base = args.preprocessed / args.dataset
    plans = write_plans(base, args)
    plans["continue_training"] = False  # what nnUNetv2_train adds before building the trainer
    conf = plans["configurations"][args.configuration]
    arch = conf["architecture"]["arch_kwargs"]
    out: dict = {
        "tool": "nnunet", "configuration": args.configuration, "plans": args.plans_out, "fold": args.fold,
        "patch_size": list(args.patch), "batch_size": args.batch, "spacing": conf["spacing"], "threads": args.threads,
        "loader_workers": args.loader_workers, "budget_minutes": args.minutes, "reserve": args.reserve,
        "network": {k: arch[k] for k in ("n_stages", "features_per_stage", "kernel_sizes", "strides")},
    }
    fold = args.fold if args.fold == "all" else int(args.fold)
    t0 = time.perf_counter()
    trainer = nnUNetTrainer(plans=plans, configuration=args.configuration, fold=fold,
                            dataset_json=load_json(str(base / "dataset.json")), device=torch.device("cpu"))
    trainer.initialize()
    out["network"]["parameters"] = int(sum(p.numel() for p in trainer.network.parameters()))
    out["model_folder"] = trainer.output_folder_base
    training_s = args.minutes * 60.0 * (1.0 - args.reserve)
    stock = (trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch, trainer.num_epochs)
    started = False
    epochs: list[dict] = []
    try:
        trainer.on_train_start()
        started = True
        out["setup_s"] = time.perf_counter() - t0
        elapsed = 0.0
        planned = trainer.num_epochs
        while trainer.current_epoch < planned:
            e0 = time.perf_counter()
            trainer.on_epoch_start()
            trainer.on_train_epoch_start()
            lr = trainer.optimizer.param_groups[0]["lr"]
            train_outputs, it = [], 0
            while it < trainer.num_iterations_per_epoch:
                if not epochs and it == PROBE_ITERS[0]:
                    p0 = time.perf_counter()
                train_outputs.append(trainer.train_step(next(trainer.dataloader_train)))
                it += 1
                if not epochs and it == PROBE_ITERS[1]:
                    per_iter = (time.perf_counter() - p0) / (PROBE_ITERS[1] - PROBE_ITERS[0])
                    n_it, n_val = fit_epoch(trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch,
                                            per_iter, training_s, args.min_epochs)
                    trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = max(n_it, it), n_val
                    out.update(probe_s_per_iter=per_iter, iters_per_epoch=trainer.num_iterations_per_epoch, val_iters_per_epoch=n_val)
            trainer.on_train_epoch_end(train_outputs)
            t_train = time.perf_counter() - e0
            with torch.no_grad():
                trainer.on_validation_epoch_start()
                val_outputs = [trainer.validation_step(next(trainer.dataloader_val)) for _ in range(trainer.num_val_iterations_per_epoch)]
                trainer.on_validation_epoch_end(val_outputs)
            trainer.on_epoch_end()
            epoch_s = time.perf_counter() - e0
            elapsed += epoch_s
            done = trainer.current_epoch
            mean_s = elapsed / done
            planned = min(stock[2], max(done, done + int(math.floor((training_s - elapsed) / mean_s))))
            trainer.num_epochs = planned
            trainer.lr_scheduler.max_steps = planned
            epochs.append({"epoch": done - 1, "iters": it, "val_iters": len(val_outputs), "train_s": t_train, "epoch_s": epoch_s,
                           "lr": lr, "train_loss": float(np.mean([o["loss"] for o in train_outputs])), "planned_epochs": planned})
            print(f"epoch {done - 1}: {it} iterations, {epoch_s:.1f} s, loss {epochs[-1]['train_loss']:.4f}, "
                  f"lr {lr:.2e}; {elapsed:.0f} of {training_s:.0f} s used, {planned} epochs planned", flush=True)
        out.update(epochs=len(epochs), iterations=sum(e["iters"] for e in epochs), training_s=elapsed, epoch_log=epochs,
                   stock_schedule={"iters_per_epoch": stock[0], "val_iters_per_epoch": stock[1], "epochs": stock[2]},
                   samples=sum(e["iters"] for e in epochs) * args.batch, main_max_rss_bytes=_max_rss_bytes(),
                   versions={"torch": torch.__version__, "numpy": np.__version__})
        return out
    finally:
        signal.alarm(0)
        if started:
            end_training(trainer)


def run_to_checkpoint(args: argparse.Namespace) -> dict:
    out = run(args)
    final = Path(out["model_folder"]) / f"fold_{args.fold}" / "checkpoint_final.pth"
    out["checkpoint"] = str(final)
    out["ok"] = final.is_file()
    if not out["ok"]:
        out["error"] = f"{final} was not written"
    return out


def main(argv: list[str] | None = None) -> int:
    return run_and_report(parse_args(argv), run_to_checkpoint)


if __name__ == "__main__":
    sys.exit(main())
