"""The training loop: epochs of SGD on random patches, per-epoch pseudo-Dice, checkpoints.

One ``Trainer`` per fold. Everything that varies (epochs, budget, network family, device) is
in ``TrainOptions``; the network and the data loaders come from factories (``Components``),
so tests and other network families plug in without subclasses.

Per epoch: the learning rate is set (poly schedule over the planned epochs), ``iters`` steps
of SGD with Nesterov momentum on batches from the infinite patch loader (Dice + CE with deep
supervision, gradients clipped to norm 12, AMP on CUDA), then ``val_iters`` batches from the
validation loader give the loss and the pseudo-Dice per class (TP/FP/FN summed over all
batches and ranks, as nnU-Net). Rank 0 appends the epoch's record to log.jsonl, saves
``checkpoint_latest.pt`` (and ``checkpoint_best.pt`` when the EMA of the mean pseudo-Dice
improves) and redraws progress.png. ``checkpoint_final.pt`` is written when training ends.

Time: every duration the trainer measures or decides on (the budget, epoch times, the speed
probe, the final-validation estimate, the ETA) comes from one clock, ``Components.clock``
(or the ``clock`` argument), ``time.perf_counter`` by default; tests pass a simulated one.
With ``--budget-minutes`` the whole of ``run`` (setup, epochs, checkpoints, the end-of-fold
validation) is fitted to the budget (see autoliver.train.schedule) and the learning rate
follows the poly schedule per iteration over the planned iterations.

Resume (``--continue``) is exact: with ``--epochs``/``--iters-per-epoch`` a run killed at any
point (``kill -9`` mid-iteration, between an epoch's log line and its checkpoint, between a
checkpoint's temporary file and its rename, during the final validation) and resumed ends
with the weights, optimiser state, log.jsonl metrics (all but the timings) and validation
outputs of an uninterrupted run with the same seed, bit for bit on the CPU. What makes it so:

- the latest checkpoint restores weights, optimiser, grad scaler, the epoch counter, the
  history, the plateau/EMA state and the numpy/python/torch generator states; the epoch that
  was cut short is trained again from its start;
- the data streams do not depend on the past: batch ``i`` of the training (and pseudo-Dice)
  stream is made from a generator seeded by (seed, rank, i) whatever the number of loader
  workers (autoliver.data.loader), and the checkpoint records how many batches each stream
  has delivered (``data_position``), where the resumed loaders start;
- torch's generator (dropout and any other draw in the main process) is reseeded at the start
  of every epoch from (seed, rank, epoch), so an epoch draws the same numbers whether it runs
  after another epoch or right after a restart, on every rank;
- ``checkpoint_best.pt`` is written before ``checkpoint_latest.pt``, so the epoch a kill
  interrupts is redone with the same decision; log.jsonl is rewritten from the checkpoint's
  history (no epoch missing or doubled); temporary files of writes killed before their
  rename are removed when the fold starts again.

Under ``--budget-minutes`` the schedule depends on measured time, so a resume cannot repeat
it: the checkpoint restores all of the above and the seconds of the budget already used
(``train_seconds``) and the budget plan (iterations per epoch, measured speeds); the epochs
still to come, their iterations and the learning-rate schedule are then re-fitted to the time
left and the speed this run measures. Every epoch finished before the kill is kept exactly.

Asking for more epochs than the checkpoint was trained for extends training (the poly
schedule then runs over the new count). A checkpoint of format 1 (no data positions) is
refused for resuming with a message saying so (it still predicts).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from autoliver.core import faults
from autoliver.core.device import select_device
from autoliver.core.errors import AutoliverError, StaleArtefactError, UsageError
from autoliver.core.layout import FoldPaths, ModelPaths
from autoliver.core.parallel import active_cluster, parallel_map
from autoliver.data.sampler import LiverRoi
from autoliver.infer.sliding_window import tile_starts
from autoliver.io.atomic import remove_stale_temporaries, write_bytes, write_json
from autoliver.io.checkpoint import (
    CheckpointError,
    capture_rng_states,
    check_resumable,
    load_checkpoint,
    restore_rng_states,
    save_checkpoint,
)
from autoliver.nets.weights import load_encoder_weights
from autoliver.preprocess.storage import load_properties
from autoliver.train import distributed as D
from autoliver.train.loss import DeepSupervisionLoss, confusion_counts
from autoliver.train.objective import Objective, Plateau
from autoliver.train.options import TrainOptions
from autoliver.train.progress import append_log, plot_progress, rewrite_log
from autoliver.train.schedule import BudgetPlan, poly_lr
from autoliver.train.validation import ValidationJob, summarise, validate_case_from_checkpoint, validate_cases
from planning.plans import Configuration

log = logging.getLogger(__name__)

EMA_DECAY = 0.9
BUDGET_PROBE_ITERS = (2, 7)  # iterations timed in the first epoch to fit a budget
BUDGET_PROBE_SHARE = 0.01  # ... or fewer (at least one) when they take this share of the budget
RECENT_EPOCHS = 3  # epochs whose measured times predict the next ones

Clock = Callable[[], float]


def epoch_torch_seed(seed: int, rank: int, epoch: int) -> int:
    """Seed of torch's generator for one epoch of one rank (a function of these alone)."""
    return int(np.random.SeedSequence([int(seed), int(rank), int(epoch), 0x746F7263]).generate_state(1, np.uint64)[0] >> 1)


def final_validation_tiles(setup: "FoldSetup", step: float) -> int:
    """Network inputs of the end-of-fold validation: the sliding-window tiles of every held-out
    case (read from their properties; one per slice and tile in 2D)."""
    if not setup.val_cases or setup.fold == "all":
        return 0
    patch = setup.config.patch_size
    tiles = 0
    for case_id in setup.val_cases:
        shape = load_properties(setup.data_folder, case_id)["shape_after_resampling"]
        spatial = shape[-len(patch):]
        n = math.prod(len(tile_starts(int(sz), int(p), step)) for sz, p in zip(spatial, patch))
        tiles += n * (int(shape[0]) if len(patch) == 2 else 1)
    return tiles


def final_validation_seconds(s_per_patch: float, setup: "FoldSetup", step: float) -> float:
    """Seconds the end-of-fold validation will take: its tiles times the measured forward time
    of one patch."""
    return final_validation_tiles(setup, step) * s_per_patch


@dataclass
class EpochTime:
    """Measured times of one epoch of this run (the clock's seconds)."""

    iters: int
    train_s: float  # the training iterations (data waits included)
    other_s: float  # the rest before the checkpoint: pseudo-Dice batches, bookkeeping
    save_s: float | None = None  # log, checkpoints and plot (None until written)
    checkpoint_s: float = 0.0  # one checkpoint file
    checkpoints: int = 0  # checkpoint files written (latest, and best when it improved)


@dataclass(frozen=True)
class FoldSetup:
    """What one fold trains on and where it writes; built by ``api.train``."""

    dataset: str
    config: Configuration
    plans_hash: str
    fold: int | str
    data_folder: Path
    output_dir: Path
    train_cases: tuple[str, ...]
    val_cases: tuple[str, ...]
    class_names: tuple[str, ...] = ("background", "liver", "tumour")
    arch: str = "unet"
    prev_stage_folder: Path | None = None
    next_stage: tuple[Path, Path] | None = None  # (fullres data folder, predicted_next_stage folder)
    pad_value: float = 0.0  # what the loader pads patches with (normalised air); the sliding window pads alike
    plans_path: Path | None = None  # the dataset's plans.json, copied into the model folder
    liver_validation: Path | None = None  # a tumour stage: its liver stage's held-out predictions (same fold)

    @property
    def paths(self) -> FoldPaths:
        return FoldPaths(Path(self.output_dir))

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class Components:
    """Factories for the network and the loaders (signatures of autoliver.nets / autoliver.data)."""

    build_network: Callable[[str, Configuration, int], torch.nn.Module]
    make_train_loader: Callable[..., Any]
    make_val_loader: Callable[..., Any]
    clock: Clock = time.perf_counter  # seconds, monotonic: every duration the trainer measures


def default_components(clock: Clock = time.perf_counter) -> Components:
    from autoliver.data.loader import make_train_loader, make_val_loader
    from autoliver.nets.registry import available_networks, build_network, net_spec

    def build(arch: str, config: Configuration, n_classes: int) -> torch.nn.Module:
        if arch not in available_networks():
            raise UsageError(f"--arch {arch!r}: unknown network architecture; available: {', '.join(available_networks())}")
        return build_network(arch, net_spec(config, n_classes))

    return Components(build, make_train_loader, make_val_loader, clock)


@dataclass(frozen=True)
class TrainResult:
    output_dir: Path
    epochs: int
    metrics: dict | None
    history: list


class Trainer:
    def __init__(self, setup: FoldSetup, options: TrainOptions, ctx: D.DistContext = D.SINGLE, components: Components | None = None,
                 clock: Clock | None = None):
        self.setup, self.options, self.ctx = setup, options, ctx
        self.components = components or default_components()
        self.clock: Clock = clock or self.components.clock
        self.device = select_device(options.device, ctx.local_rank)
        self.out = Path(setup.output_dir)
        self.paths = setup.paths
        self.history: list[dict] = []
        self.epoch = 0
        self.data_position = {"train_batches": 0, "val_batches": 0}  # batches each data stream has delivered
        self.best_ema: float | None = None
        self.train_seconds = 0.0  # seconds of the budget used: earlier runs (resume) and this one up to its last epoch
        self._prior_seconds = 0.0  # of those, the earlier runs'
        self._t_run = self.clock()  # when this run started (reset by ``run``)
        self._times: list[EpochTime] = []  # this run's epochs
        self._probe_s: float | None = None  # seconds per iteration measured early in the first epoch
        self._s_per_patch: list[float] = []  # measured forward seconds of one validation patch
        self._final_tiles: int | None = None
        self.iters_per_epoch = options.iters_per_epoch
        self.val_iters = options.val_iters  # a budget may shorten both
        self.budget: BudgetPlan | None = None
        self.loss: DeepSupervisionLoss | None = None
        self.objective = Objective.of(setup.config.training, f"configuration {setup.config.name} (plans.json)")
        self.lr0 = self.objective.initial_lr(options.initial_lr)
        obj = self.objective
        self.plateau = Plateau(self.lr0, obj.plateau_factor, obj.plateau_patience, obj.early_stopping_patience) \
            if obj.schedule == "plateau" or obj.early_stopping_patience else None
        self.stopped_early = False
        self.finished = False

    # ----------------------------------------------------------------- setup
    def _build(self) -> None:
        torch.manual_seed(self.options.seed)
        self.network = self.components.build_network(self.setup.arch, self.setup.config, self.setup.n_classes)
        if self.options.encoder_weights is not None and not self.options.resume:
            try:
                loaded = load_encoder_weights(self.network, self.options.encoder_weights)
            except (ValueError, ImportError) as exc:
                raise UsageError(f"--encoder-weights: {exc}") from None
            log.info("encoder weights from %s: %d tensors loaded", loaded.path, len(loaded.loaded))
        self.network = self.network.to(self.device)
        self.model = self.network
        if self.ctx.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.network, device_ids=ids)
        o = self.options
        self.optimiser = self.objective.make_optimiser(self.network.parameters(), o.initial_lr, o.weight_decay, o.momentum)
        self.use_scaler = self.device.type == "cuda" and o.amp
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_scaler)
        if self.device.type == "cuda":
            self.autocast = torch.float16 if o.amp else None
        else:
            self.autocast = torch.bfloat16 if o.cpu_bf16 else None
        torch.manual_seed(self.options.seed + 1000 * self.ctx.rank)

    def _state(self) -> dict:
        return {
            "epoch": self.epoch,
            "weights": self.network.state_dict(),
            "optimiser": self.optimiser.state_dict(),
            "grad_scaler": self.scaler.state_dict() if self.use_scaler else None,
            "rng": capture_rng_states(),
            "data_position": dict(self.data_position),
            "plans_hash": self.setup.plans_hash,
            "configuration": asdict(self.setup.config),
            "options": self.options.to_json(),
            "history": self.history,
            "best_ema": self.best_ema,
            "train_seconds": self.train_seconds,
            "iters_per_epoch": self.iters_per_epoch if self.budget is None else self.budget.iters_per_epoch,
            "val_iters": self.val_iters,
            "budget": None if self.budget is None else self.budget.to_json(),
            "plateau": None if self.plateau is None else self.plateau.state_dict(),
            "stopped_early": self.stopped_early,
            "network": {"arch": self.setup.arch, "n_classes": self.setup.n_classes, "class_names": list(self.setup.class_names)},
            "dataset": self.setup.dataset,
            "fold": str(self.setup.fold),
            "world_size": self.ctx.world_size,
        }

    def _resume(self) -> None:
        latest = self.paths.latest
        if not self.options.resume:
            if latest.exists():
                raise AutoliverError(f"{latest} exists: this fold was trained before; add --continue to resume it, or delete {self.out} to start again")
            return
        if not latest.exists():
            log.info("--continue: no %s yet, starting the fold from scratch", latest)
            return
        state = load_checkpoint(latest, map_location=self.device)
        check_resumable(latest, state)
        if state["plans_hash"] != self.setup.plans_hash:
            raise StaleArtefactError(f"{latest}: trained with another plans.json (hash {state['plans_hash'][:12]} vs {self.setup.plans_hash[:12]}); delete {self.out} to train this fold again")
        if state["network"]["arch"] != self.setup.arch:
            raise CheckpointError(f"{latest}: network {state['network']['arch']!r}, but --arch {self.setup.arch!r} was asked for; resume with --arch {state['network']['arch']}")
        try:
            self.network.load_state_dict(state["weights"])
            self.optimiser.load_state_dict(state["optimiser"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{latest}: does not fit this network ({str(exc).splitlines()[0][:160]}); delete {self.out} to train again") from None
        if self.use_scaler and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        restore_rng_states(state["rng"])  # torch's is reseeded per epoch and rank anyway (epoch_torch_seed)
        self.data_position = {k: int(v) for k, v in state["data_position"].items()}
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.best_ema = state["best_ema"]
        self.train_seconds = self._prior_seconds = float(state["train_seconds"])
        self.iters_per_epoch = int(state["iters_per_epoch"]) if self.options.budget_minutes else self.options.iters_per_epoch
        self.val_iters = int(state.get("val_iters", self.options.val_iters)) if self.options.budget_minutes else self.options.val_iters
        if state.get("budget") and self.options.budget_minutes:
            b = BudgetPlan.from_json(state["budget"])
            self.budget = replace(b, budget_s=self.options.budget_minutes * 60.0, max_epochs=self.options.epochs)
        if self.plateau is not None and state.get("plateau"):
            self.plateau.load_state_dict(state["plateau"])
        self.stopped_early = bool(state.get("stopped_early", False))
        log.info("resuming %s from epoch %d", latest, self.epoch)

    # ----------------------------------------------------------------- loop
    def _target_epochs(self) -> int:
        return self.budget.planned_epochs if self.budget is not None else self.options.epochs

    def _epoch_iters(self) -> int:
        """Training iterations of the coming epoch (under a budget the last one may differ)."""
        return self.budget.epoch_iters(self.epoch) if self.budget is not None else self.iters_per_epoch

    def _iters_done(self) -> int:
        return sum(int(r.get("iters", self.iters_per_epoch)) for r in self.history)

    def _lr_at(self, it: int, iters_done: int) -> float:
        """Learning rate of iteration ``it`` of the current epoch: per epoch over the planned
        epochs, or, under a budget, per iteration over the planned iterations."""
        if self.objective.schedule == "plateau" and self.plateau is not None:
            return self.plateau.lr
        if self.budget is None:
            return poly_lr(self.epoch, self._target_epochs(), self.lr0)
        return poly_lr(iters_done + it, self.budget.total_iters(self.epoch, iters_done), self.lr0)

    def _forward_loss(self, batch: dict) -> torch.Tensor:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            outputs = self.model(data)
        if self.loss is None:
            n = 1 if isinstance(outputs, torch.Tensor) else len(outputs)
            self.loss = self.objective.make_loss(n, batch_dice=self.options.batch_dice)
        return self.loss(outputs, target), outputs

    def _train_epoch(self, loader) -> dict:
        clock = self.clock
        self.model.train()
        self.network.deep_supervision = True
        iters_done = self._iters_done()
        n_iters = self._epoch_iters()
        lr = self._lr_at(0, iters_done)
        first_lr = lr
        for g in self.optimiser.param_groups:
            g["lr"] = lr
        losses, tumour, samples, wait = [], 0, 0, 0.0
        bar = tqdm(total=n_iters, desc=f"epoch {self.epoch}", unit="it", leave=False, disable=not (self.options.progress and self.ctx.is_main))
        t0 = clock()
        it = 0
        while it < n_iters:
            faults.point("train.iteration")
            if self.budget is not None and it:
                lr = self._lr_at(it, iters_done)
                for g in self.optimiser.param_groups:
                    g["lr"] = lr
            tw = clock()
            batch = next(loader)
            self.data_position["train_batches"] += 1
            wait += clock() - tw
            self.optimiser.zero_grad(set_to_none=True)
            loss, _ = self._forward_loss(batch)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimiser)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.options.grad_clip)
            self.scaler.step(self.optimiser)
            self.scaler.update()
            losses.append(float(loss.detach()))
            tumour += int(torch.as_tensor(batch["tumour"]).sum())
            samples += int(batch["data"].shape[0])
            it += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if self.budget is not None and not self.history and self._probe_s is None and self._probe_due(it):
                self._probe_s = D.broadcast_float((clock() - self._probe_t0) / (it - BUDGET_PROBE_ITERS[0]), self.ctx)
                self._estimate_final()
                fitted = self.budget.fit_iterations(self._probe_s)
                self.budget, self.iters_per_epoch, self.val_iters = fitted, fitted.iters_per_epoch, fitted.val_iters
                n_iters = self._epoch_iters()  # the loop ends here if the epoch is already longer
                bar.total = max(n_iters, it)
            if it == BUDGET_PROBE_ITERS[0]:
                self._probe_t0 = clock()
        bar.close()
        sums = D.all_reduce_sum(torch.tensor([sum(losses), len(losses), tumour, samples, wait], dtype=torch.float64), self.ctx)
        seconds = clock() - t0
        out = {"train_loss": float(sums[0] / max(sums[1], 1)), "tumour_share": float(sums[2] / max(sums[3], 1)),
               "samples": int(sums[3]), "train_s": seconds, "data_wait_share": float(sums[4] / self.ctx.world_size / max(seconds, 1e-9)),
               "iters": it, "lr": first_lr}
        if self.budget is not None:
            out["lr_last"] = lr
        return out

    def _probe_due(self, it: int) -> bool:
        """Time to fit the epochs to the budget: after the probe's iterations, or earlier when
        they would take more than BUDGET_PROBE_SHARE of it (rank 0 decides for all)."""
        if it == BUDGET_PROBE_ITERS[1]:
            return True
        if not BUDGET_PROBE_ITERS[0] < it < BUDGET_PROBE_ITERS[1]:
            return False
        slow = self.clock() - self._probe_t0 >= BUDGET_PROBE_SHARE * self.budget.budget_s
        return bool(D.broadcast_float(1.0 if slow else 0.0, self.ctx))

    @torch.no_grad()
    def _val_epoch(self, loader) -> dict:
        if self.val_iters == 0 or loader is None:
            return {"val_loss": None, "pseudo_dice": {}}
        clock = self.clock
        self.network.eval()
        self.network.deep_supervision = False
        counts = torch.zeros((self.setup.n_classes - 1, 3), dtype=torch.float64)
        loss_sum = 0.0
        forward_s, samples = 0.0, 0
        for _ in range(self.val_iters):
            batch = next(loader)
            self.data_position["val_batches"] += 1
            t0 = clock()
            data, target = batch["data"].to(self.device), batch["target"].to(self.device)
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                out = self.network(data)
            out = out[0] if isinstance(out, (list, tuple)) else out
            forward_s += clock() - t0
            samples += int(data.shape[0])
            loss_sum += float(self.objective.make_loss(1, self.options.batch_dice)(out.float(), target))
            counts += confusion_counts(out.float(), target, self.setup.n_classes).cpu()
        self.network.deep_supervision = True
        sums = D.all_reduce_sum(torch.cat([counts.flatten(), torch.tensor([loss_sum, self.val_iters], dtype=torch.float64)]), self.ctx)
        counts = sums[:-2].reshape(-1, 3)
        dice = {}
        for c in range(1, self.setup.n_classes):
            tp, fp, fn = counts[c - 1].tolist()
            dice[self.setup.class_names[c]] = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) > 0 else float("nan")
        return {"val_loss": float(sums[-2] / sums[-1]), "pseudo_dice": dice, "val_s_per_patch": forward_s / max(samples, 1)}

    def _loaders(self):
        s, o, c = self.setup, self.options, self.ctx
        config = s.config
        common = dict(prev_stage_folder=s.prev_stage_folder, n_classes=s.n_classes, batch_size=D.local_batch_size(s.config.batch_size, c))
        if config.stage == "tumour":  # a two-stage design's tumour stage learns inside the liver's box
            common["roi"] = LiverRoi(config.roi_margin_mm)
        extra = {} if o.tumour_share is None else {"tumour_share": o.tumour_share}
        # the streams' seeds depend on (seed, rank) only; a resumed run starts them where they stopped
        pos = self.data_position
        train = self.components.make_train_loader(s.data_folder, list(s.train_cases), config, seed=D.rank_seed(o.seed, c),
                                                  n_workers=o.n_workers, oversample_foreground=o.oversample_foreground,
                                                  start=pos["train_batches"], **extra, **common)
        val = None
        if o.val_iters > 0 and s.val_cases:
            val = self.components.make_val_loader(s.data_folder, list(s.val_cases), config, seed=D.rank_seed(o.seed + 1, c), n_workers=0,
                                                    oversample_foreground=o.oversample_foreground, start=pos["val_batches"], **common)
        return train, val

    def _end_epoch(self, record: dict) -> tuple[float, int]:
        """Log, checkpoints and plot of the epoch just trained; returns the seconds one
        checkpoint file took and the number written (rank 0; 0 elsewhere)."""
        mean = [v for v in record["pseudo_dice"].values() if v == v]
        score = sum(mean) / len(mean) if mean else None
        if score is not None:
            self.best_ema = score if self.best_ema is None else EMA_DECAY * self.best_ema + (1 - EMA_DECAY) * score
        record["pseudo_dice_mean"] = score
        prev_best = max((r["pseudo_dice_ema"] for r in self.history if r.get("pseudo_dice_ema") is not None), default=None)
        record["pseudo_dice_ema"] = self.best_ema
        self.history.append(record)
        self.epoch += 1
        checkpoint_s, files = 0.0, 0
        if self.ctx.is_main:
            append_log(self.paths.log, record)
            faults.point("train.log_appended")
            state = self._state()
            files = 0
            if self.best_ema is not None and (prev_best is None or self.best_ema > prev_best):
                save_checkpoint(self.paths.best, state)  # before latest: a kill in between redoes this epoch, and this write
                files += 1
            t0 = self.clock()
            save_checkpoint(self.paths.latest, state)
            checkpoint_s, files = self.clock() - t0, files + 1
            plot_progress(self.paths.progress, self.history)
        log.info("epoch %d: train loss %.4f, val loss %s, pseudo-Dice %s, lr %.2e, %.1f s%s",
                 record["epoch"], record["train_loss"], "n/a" if record["val_loss"] is None else f"{record['val_loss']:.4f}",
                 {k: round(v, 4) for k, v in record["pseudo_dice"].items()}, record["lr"], record["epoch_s"],
                 "" if record.get("eta_s") is None else f", {record['eta_s'] / 60:.1f} min to go")
        return checkpoint_s, files

    # ----------------------------------------------------------------- budget
    def _used_seconds(self) -> float:
        """Seconds of the budget used: earlier runs' and this run's so far."""
        return self._prior_seconds + (self.clock() - self._t_run)

    def _recent(self) -> list[EpochTime]:
        """This run's last epochs; its first (warm-up: first batches, first plot) only while alone."""
        return (self._times[1:] if len(self._times) > 1 else self._times)[-RECENT_EPOCHS:]

    def _seconds_per_iter(self) -> float:
        if len(self._times) == 1 and self._probe_s:
            return self._probe_s
        recent = self._recent()
        iters = sum(t.iters for t in recent)
        if iters:
            return sum(t.train_s for t in recent) / iters
        return self._probe_s or (self.budget.s_per_iter if self.budget is not None else 0.0)

    def _save_seconds(self) -> tuple[float, float, float]:
        """Seconds of an epoch's log, checkpoints and plot: the mean of the recent epochs, and
        the most it may take (both checkpoint files, as when checkpoint_best.pt improves); and
        of one checkpoint file. The latter two are kept for what is still to come at the end."""
        done = [t for t in self._times if t.save_s is not None]
        done = (done[1:] if len(done) > 1 else done)[-RECENT_EPOCHS:]
        if not done:
            return 0.0, 0.0, 0.0
        checkpoint_s = max(t.checkpoint_s for t in done)
        rest = max(max(0.0, t.save_s - t.checkpoint_s * t.checkpoints) for t in done)
        return sum(t.save_s for t in done) / len(done), rest + 2 * checkpoint_s, checkpoint_s

    def _overhead_seconds(self) -> float:
        """Estimated seconds an epoch spends besides its training iterations."""
        recent = self._recent()
        if not recent:
            return self.budget.epoch_overhead_s if self.budget is not None else 0.0
        save, _, _ = self._save_seconds()
        return sum(t.other_s + (save if t.save_s is None else t.save_s) for t in recent) / len(recent)

    def _estimate_final(self) -> None:
        """Seconds after the last epoch (final checkpoint + end-of-fold validation), from the
        measured forward time of one patch (else the training speed)."""
        o, s = self.options, self.setup
        if not self._times and self._probe_s is None and (self.budget.final_known or self.budget.final_s):
            return  # resumed, nothing measured yet in this run: the checkpoint's estimate stands
        validates = o.final_validation and s.fold != "all" and bool(s.val_cases)
        if validates and self._final_tiles is None:
            self._final_tiles = final_validation_tiles(s, o.val_step)
        tiles = self._final_tiles or 0
        if not validates or not tiles:
            per_patch = 0.0
        elif self._s_per_patch:
            recent = self._s_per_patch[-RECENT_EPOCHS:]
            per_patch = sum(recent) / len(recent)
        else:  # no pseudo-Dice batches: a forward pass is about val_cost of a training iteration
            per_patch = self._seconds_per_iter() * self.budget.val_cost / max(1, D.local_batch_size(s.config.batch_size, self.ctx))
        _, _, checkpoint_s = self._save_seconds()
        estimate = D.broadcast_float(tiles * per_patch / self.ctx.world_size + checkpoint_s, self.ctx)
        first = not self.budget.final_known
        self.budget = replace(self.budget, final_s=estimate, final_known=True)
        if first:
            log.info("final validation estimated at %.0f s; %.0f s of the budget left for training", estimate, self.budget.training_s)
            if estimate > 0.5 * self.budget.budget_s:
                log.warning("the final validation (%.0f s) takes more than half of the %.0f s budget: training gets %.0f s; "
                            "--no-validation or a faster device leaves more to training", estimate, self.budget.budget_s, self.budget.training_s)

    def _refit_budget(self, pending_save: bool) -> None:
        """Re-plan the remaining epochs from the clock; ``pending_save``: the epoch just trained
        has yet to write its log and checkpoints (their time is estimated)."""
        _, save, _ = self._save_seconds()
        used = self._used_seconds() + (save if pending_save else 0.0)
        self._estimate_final()
        plan = self.budget.refit(self.epoch + (1 if pending_save else 0), used, self._seconds_per_iter(), self._overhead_seconds())
        planned = int(D.broadcast_float(plan.planned_epochs, self.ctx))
        last = int(D.broadcast_float(plan.last_iters, self.ctx))
        self.budget = replace(plan, planned_epochs=planned, last_iters=last)

    def _eta_seconds(self, epochs_done: int) -> float | None:
        """Seconds until training and the final validation end, as planned now."""
        if self.budget is not None:
            epochs = self.budget.planned_epochs - epochs_done
            iters = self.budget.total_iters(epochs_done, 0) if epochs > 0 else 0
            return max(0.0, epochs * self._overhead_seconds() + iters * self._seconds_per_iter() + self.budget.final_s)
        recent = self._recent()
        if not recent:
            return None
        per_epoch = sum(t.train_s + t.other_s + (t.save_s or 0.0) for t in recent) / len(recent)
        return max(0, self.options.epochs - epochs_done) * per_epoch

    # ----------------------------------------------------------------- run
    def train(self) -> None:
        """Train until the target epoch count (or the budget) is reached; write the final checkpoint."""
        o = self.options
        clock = self.clock
        if o.budget_minutes is not None and self.budget is None:
            self.budget = BudgetPlan.start(o.budget_minutes * 60.0, o.epochs, o.iters_per_epoch, val_iters=o.val_iters if self.setup.val_cases else 0)
        if self.ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.out, self.paths.validation)  # of writes killed before their rename
            rewrite_log(self.paths.log, self.history)
        if self.budget is not None and self.history:  # resumed: the budget may have changed, time has passed
            self._refit_budget(pending_save=False)
        if self.epoch >= self._target_epochs():
            log.info("%s: already trained for %d epochs", self.out, self.epoch)
        else:
            train_loader, val_loader = self._loaders()
            try:
                train_it = iter(train_loader)
                val_it = None if val_loader is None else iter(val_loader)
                while self.epoch < self._target_epochs():
                    torch.manual_seed(epoch_torch_seed(o.seed, self.ctx.rank, self.epoch))
                    t0 = clock()
                    record = {"epoch": self.epoch, **self._train_epoch(train_it)}
                    record.update(self._val_epoch(val_it))
                    t_val = clock()
                    epoch_s = t_val - t0
                    record.update(epoch_s=epoch_s, samples_per_s=record["samples"] / max(record["train_s"], 1e-9),
                                  world_size=self.ctx.world_size, time=time.time())
                    self._times.append(EpochTime(record["iters"], record["train_s"], epoch_s - record["train_s"]))
                    if record.get("val_s_per_patch"):
                        self._s_per_patch.append(record["val_s_per_patch"])
                    if self.budget is not None:
                        self._refit_budget(pending_save=True)
                        record["planned_epochs"] = self.budget.planned_epochs
                    save, _, _ = self._save_seconds()
                    self.train_seconds = self._used_seconds() + save  # as at the end of this epoch's checkpoint
                    record["eta_s"] = self._eta_seconds(self.epoch + 1)
                    if self.plateau is not None:
                        self.plateau.step(record.get("val_loss"))
                        record["plateau"] = self.plateau.state_dict()
                    checkpoint_s, files = self._end_epoch(record)
                    self._times[-1].save_s, self._times[-1].checkpoint_s, self._times[-1].checkpoints = clock() - t_val, checkpoint_s, files
                    if self.plateau is not None and self.plateau.should_stop:
                        self.stopped_early = True
                        log.info("early stopping: no better validation loss for %d epochs", self.plateau.since_best)
                        break
            finally:
                for loader in (train_loader, val_loader):
                    if loader is not None and hasattr(loader, "close"):
                        loader.close()
        self.train_seconds = self._used_seconds()
        if self.ctx.is_main:
            save_checkpoint(self.paths.final, self._state())
        D.barrier(self.ctx)
        self.finished = True

    def validate(self) -> dict | None:
        """Predict the fold's validation cases whole; rank 0 writes metrics.json."""
        s = self.setup
        if s.fold == "all" or not self.options.final_validation:
            log.info("no held-out cases to validate (fold %s)", s.fold)
            return None
        self.network.eval()
        self.network.deep_supervision = False
        mine = list(s.val_cases)[self.ctx.rank :: self.ctx.world_size]
        job = ValidationJob(s.config, s.data_folder, self.paths.validation, epoch=self.epoch, device=self.device, n_classes=s.n_classes,
                            step=self.options.val_step, autocast_dtype=self.autocast, prev_stage_folder=s.prev_stage_folder,
                            save_probabilities=self.options.save_probabilities, next_stage=s.next_stage, pad_value=s.pad_value,
                            liver_validation=s.liver_validation)
        if not self._validate_on_cluster(job, mine):
            validate_cases(self.network, job, mine)
        D.barrier(self.ctx)
        if not self.ctx.is_main:
            return None
        per_case = {c: json.loads(self.paths.validation_case(c, ".json").read_text(encoding="utf-8"))["dice"] for c in s.val_cases}
        metrics = summarise(per_case, {"configuration": s.config.name, "fold": s.fold, "epoch": self.epoch, "plans_hash": s.plans_hash})
        write_json(self.paths.metrics, metrics)
        log.info("%s: mean liver Dice %.4f, tumour Dice %.4f", self.paths.metrics, metrics["mean"]["liver"], metrics["mean"]["tumour"])
        return metrics

    def _validate_on_cluster(self, job: ValidationJob, cases: list[str]) -> bool:
        """Inside ``--scheduler``: the validation cases as cluster tasks (CPU workers reading the
        final checkpoint, which holds exactly these weights); False when it does not apply."""
        if active_cluster() is None or self.ctx.world_size > 1 or not cases or not self.finished:
            return False  # self.finished: train() has just written these weights as the final checkpoint
        cpu = torch.device("cpu")
        on_workers = replace(job, device=cpu, autocast_dtype=job.autocast_dtype if job.device.type == "cpu" else None)
        log.info("validating %d case(s) on the Dask cluster", len(cases))
        for _ in parallel_map(validate_case_from_checkpoint, [(str(self.paths.final), on_workers, c) for c in cases],
                              progress=self.options.progress, desc="validate"):
            pass
        return True

    def _copy_plans(self) -> None:
        """Copy the dataset's plans.json into the model folder (results/<dataset>/), so that the
        folder is self-contained for ``autoliver predict -m``."""
        source, target = self.setup.plans_path, ModelPaths(self.paths.model_dir).plans
        if not self.ctx.is_main or source is None or not source.is_file():
            return
        if target.is_file() and target.read_bytes() == source.read_bytes():
            return
        write_bytes(target, source.read_bytes())
        log.info("copied %s to %s", source, target)

    def run(self) -> TrainResult:
        self._t_run = self.clock()
        D.init(self.ctx, self.device)
        try:
            self._build()
            self._copy_plans()
            self._resume()
            self.train()
            t0 = self.clock()
            metrics = self.validate()
            if metrics is not None:
                estimate = "" if self.budget is None else f" (estimated {self.budget.final_s:.0f} s)"
                log.info("final validation took %.0f s%s; %.0f s in all", self.clock() - t0, estimate, self._used_seconds())
            return TrainResult(self.out, self.epoch, metrics, list(self.history))
        finally:
            D.shutdown(self.ctx)
