"""nnU-Net v2's stock ``nnUNetTrainer`` on the CPU at a forced patch and batch size; runs under
nnU-Net's own Python in a ``benchmarks.child`` process (imports nnunetv2 and torch, never autoliver).

- ``force_patch_and_batch``: the plans with a configuration's patch and batch replaced and its
  U-Net topology re-derived for that patch exactly as nnU-Net's experiment planner derives it
  (``get_pool_and_conv_props``, 32 base features capped at 320 in 3D and 512 in 2D, two
  convolutions per stage); a patch nnU-Net would have to pad is refused.
- ``probe``: the trainer built as ``nnUNetv2_train`` builds it, ``initialize()``,
  ``on_train_start()`` (its multi-process loaders, ``nnUNet_n_proc_DA`` workers), W warm-up and
  N timed ``train_step(next(dataloader_train))`` iterations (the wait for the batch and the
  step apart), then the training loader alone by ``harness.loader``'s rule; ``on_train_end()``.
- ``train_budget``: the loop of ``nnUNetTrainer.run_training`` (train and validation steps,
  epoch hooks, checkpoints) fitted to a wall-clock budget the way autoliver's
  ``--budget-minutes`` fits its own: iterations 2..6 of the first epoch are timed; when fewer
  than ``min_epochs`` stock epochs (250 + 50 validation iterations) fit, both counts shrink by
  the same factor; after every epoch the epoch count is re-estimated and the poly learning rate
  (``lr_scheduler.max_steps``) follows it; ``reserve`` of the budget is kept back. The plans are
  saved as ``plans_out`` (same data identifier) so that ``nnUNetv2_predict -p plans_out`` builds
  the network it trained; ``on_train_end()`` writes ``checkpoint_final.pth``; the final
  validation of ``nnUNetv2_train`` is skipped.
"""

from __future__ import annotations

import math
import sys
import time
from copy import deepcopy
from pathlib import Path

from benchmarks.harness.loader import throughput

MAX_FEATURES = {2: 512, 3: 320}  # nnU-Net ExperimentPlanner: UNet_max_features_2d / _3d
BASE_FEATURES, MIN_FEATURE_MAP_EDGE, CONVS_PER_STAGE = 32, 4, 2
PROBE_ITERS = (2, 7)  # iterations [2, 7) of the first epoch are timed, as autoliver's budget does
VAL_COST = 0.35  # one validation batch in training iterations, as autoliver's budget assumes


def force_patch_and_batch(plans: dict, configuration: str, patch: list[int], batch: int) -> dict:
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    plans = deepcopy(plans)
    conf = plans["configurations"][configuration]
    if "inherits_from" in conf:
        conf = {**deepcopy(plans["configurations"][conf["inherits_from"]]), **conf}
        del conf["inherits_from"]
        plans["configurations"][configuration] = conf
    spacing = conf["spacing"]
    if len(patch) != len(spacing):
        raise ValueError(f"patch {patch} has {len(patch)} values but {configuration} is {len(spacing)}D")
    _, strides, kernels, padded, _ = get_pool_and_conv_props(spacing, patch, MIN_FEATURE_MAP_EDGE, 999999)
    if [int(v) for v in padded] != list(patch):
        raise ValueError(f"patch {patch} is not divisible by nnU-Net's pooling for it; nnU-Net would pad it to {list(padded)}")
    n = len(strides)
    conf["architecture"]["arch_kwargs"].update(
        n_stages=n, features_per_stage=[min(MAX_FEATURES[len(spacing)], BASE_FEATURES * 2**i) for i in range(n)],
        kernel_sizes=[list(k) for k in kernels], strides=[list(s) for s in strides],
        n_conv_per_stage=[CONVS_PER_STAGE] * n, n_conv_per_stage_decoder=[CONVS_PER_STAGE] * (n - 1))
    conf["patch_size"], conf["batch_size"] = list(patch), batch
    return plans


def _trainer(preprocessed: str, dataset: str, configuration: str, plans: dict, fold, threads: int):
    import torch

    torch.set_num_threads(threads)
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    plans["continue_training"] = False  # what nnUNetv2_train adds before building the trainer
    trainer = nnUNetTrainer(plans=plans, configuration=configuration, fold=fold, device=torch.device("cpu"),
                            dataset_json=load_json(str(Path(preprocessed) / dataset / "dataset.json")))
    trainer.initialize()
    arch = plans["configurations"][configuration]["architecture"]["arch_kwargs"]
    network = {k: arch[k] for k in ("n_stages", "features_per_stage", "kernel_sizes", "strides")}
    network["parameters"] = int(sum(p.numel() for p in trainer.network.parameters()))
    return trainer, network


def _end(trainer) -> None:
    """``on_train_end`` (checkpoint_final.pth, loaders shut down); failing that, stop the loaders directly."""
    try:
        trainer.on_train_end()
    except Exception as exc:  # noqa: BLE001 - no worker process may be left behind
        print(f"on_train_end failed ({exc!r}); stopping the loaders directly", file=sys.stderr)
        for dl in (trainer.dataloader_train, trainer.dataloader_val):
            if hasattr(dl, "_finish"):
                dl._finish()


def probe(preprocessed: str, dataset: str, configuration: str, patch: list[int], batch: int, plans: str = "nnUNetPlans",
          fold: int = 0, warmup: int = 2, iters: int = 10, loader_batches: int = 10, threads: int = 2, loader_workers: int = 2) -> dict:
    from batchgenerators.utilities.file_and_folder_operations import load_json

    forced = force_patch_and_batch(load_json(str(Path(preprocessed) / dataset / f"{plans}.json")), configuration, patch, batch)
    t0 = time.perf_counter()
    trainer, network = _trainer(preprocessed, dataset, configuration, forced, fold, threads)
    out = {"tool": "nnunet", "configuration": configuration, "patch_size": list(patch), "batch_size": batch, "network": network}
    trainer.on_train_start()
    try:
        trainer.on_train_epoch_start()
        out["setup_s"] = time.perf_counter() - t0
        dl = trainer.dataloader_train
        wait, step = [], []
        for i in range(warmup + iters):
            t1 = time.perf_counter()
            b = next(dl)
            t2 = time.perf_counter()
            trainer.train_step(b)
            if i >= warmup:
                wait.append(t2 - t1)
                step.append(time.perf_counter() - t2)
        total = sum(wait) + sum(step)
        out.update(s_per_iter=total / iters, its_per_s=iters / total, step_s_per_iter=sum(step) / iters,
                   loader_wait_s_per_iter=sum(wait) / iters, train_samples_per_s=iters * batch / total, step_s=step, wait_s=wait)
        drain = 2 * getattr(dl, "num_cached", 6) + loader_workers + 2 if loader_workers else 1
        out.update(throughput(lambda: next(dl), batch, drain, loader_batches))
        return out
    finally:
        _end(trainer)


def fit_epoch(iters: int, val_iters: int, s_per_iter: float, training_s: float, min_epochs: int) -> tuple[int, int]:
    """(iterations, validation iterations) per epoch so that ``min_epochs`` epochs fit ``training_s``."""
    epoch_s = s_per_iter * (iters + val_iters * VAL_COST)
    if epoch_s <= 0 or training_s / epoch_s >= min_epochs:
        return iters, val_iters
    factor = training_s / epoch_s / min_epochs
    return max(1, int(iters * factor)), max(1, int(val_iters * factor)) if val_iters else 0


def train_budget(preprocessed: str, dataset: str, configuration: str, patch: list[int] | None, batch: int | None, minutes: float,
                 plans_in: str = "nnUNetPlans", plans_out: str = "nnUNetPlansBench", fold: str = "all", reserve: float = 0.1,
                 min_epochs: int = 10, threads: int = 2) -> dict:
    """``patch`` None: nnU-Net's own plan of ``configuration`` unchanged (saved as ``plans_out``)."""
    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

    base = Path(preprocessed) / dataset
    plans = load_json(str(base / f"{plans_in}.json"))
    if patch is None:
        forced = deepcopy(plans)
        own = plans["configurations"][configuration]
        patch, batch = list(own["patch_size"]), int(own["batch_size"])
    else:
        forced = force_patch_and_batch(plans, configuration, patch, batch)
    forced["plans_name"] = plans_out
    save_json(forced, str(base / f"{plans_out}.json"), sort_keys=False)
    t0 = time.perf_counter()
    trainer, network = _trainer(preprocessed, dataset, configuration, forced, fold if fold == "all" else int(fold), threads)
    out = {"tool": "nnunet", "configuration": configuration, "plans": plans_out, "fold": fold, "patch_size": list(patch),
           "batch_size": batch, "spacing": forced["configurations"][configuration]["spacing"], "budget_minutes": minutes,
           "network": network, "model_folder": trainer.output_folder_base}
    training_s = minutes * 60.0 * (1.0 - reserve)
    stock = (trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch, trainer.num_epochs)
    epochs: list[dict] = []
    trainer.on_train_start()
    try:
        out["setup_s"] = time.perf_counter() - t0
        elapsed, planned = 0.0, trainer.num_epochs
        while trainer.current_epoch < planned:
            e0 = time.perf_counter()
            trainer.on_epoch_start()
            trainer.on_train_epoch_start()
            lr = trainer.optimizer.param_groups[0]["lr"]
            losses, it = [], 0
            while it < trainer.num_iterations_per_epoch:
                if not epochs and it == PROBE_ITERS[0]:
                    p0 = time.perf_counter()
                losses.append(trainer.train_step(next(trainer.dataloader_train)))
                it += 1
                if not epochs and it == PROBE_ITERS[1]:
                    per_iter = (time.perf_counter() - p0) / (PROBE_ITERS[1] - PROBE_ITERS[0])
                    n_it, n_val = fit_epoch(trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch, per_iter, training_s, min_epochs)
                    trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = max(n_it, it), n_val
                    out.update(probe_s_per_iter=per_iter, iters_per_epoch=trainer.num_iterations_per_epoch, val_iters_per_epoch=n_val)
            trainer.on_train_epoch_end(losses)
            with torch.no_grad():
                trainer.on_validation_epoch_start()
                val = [trainer.validation_step(next(trainer.dataloader_val)) for _ in range(trainer.num_val_iterations_per_epoch)]
                trainer.on_validation_epoch_end(val)
            trainer.on_epoch_end()
            elapsed += time.perf_counter() - e0
            done = trainer.current_epoch
            planned = min(stock[2], max(done, done + int(math.floor((training_s - elapsed) / (elapsed / done)))))
            trainer.num_epochs = trainer.lr_scheduler.max_steps = planned
            epochs.append({"epoch": done - 1, "iters": it, "val_iters": len(val), "epoch_s": time.perf_counter() - e0, "lr": lr,
                           "train_loss": float(np.mean([o["loss"] for o in losses])), "planned_epochs": planned})
            print(f"epoch {done - 1}: {it} iterations, loss {epochs[-1]['train_loss']:.4f}, lr {lr:.2e}; "
                  f"{elapsed:.0f} of {training_s:.0f} s used, {planned} epochs planned", flush=True)
        out.update(epochs=len(epochs), iterations=sum(e["iters"] for e in epochs), training_s=elapsed, epoch_log=epochs,
                   samples=sum(e["iters"] for e in epochs) * batch,
                   stock_schedule={"iters_per_epoch": stock[0], "val_iters_per_epoch": stock[1], "epochs": stock[2]})
    finally:
        _end(trainer)
    final = Path(out["model_folder"]) / f"fold_{fold}" / "checkpoint_final.pth"
    if not final.is_file():
        raise RuntimeError(f"{final} was not written")
    out["checkpoint"] = str(final)
    return out
