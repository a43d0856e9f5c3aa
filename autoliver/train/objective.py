"""What a configuration's ``training`` entry asks of the trainer, in one place: the loss, the
optimiser and its learning rate, the schedule (``poly``, the default, or ``plateau``) and the
stopping rule (early stopping on the validation loss).

    training = {"loss": "dice", "optimiser": "adam", "lr": 1e-3, "schedule": "plateau",
                "plateau_factor": 0.5, "plateau_patience": 3, "early_stopping_patience": 10}

Unknown keys are an error naming the configuration. ``Plateau`` is a small state machine with
``state_dict``/``load_state_dict`` so that a resumed run continues exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from autoliver.core.errors import PlanError
from autoliver.train.loss import LOSSES, DeepSupervisionLoss

KEYS = ("loss", "optimiser", "lr", "weight_decay", "momentum", "schedule", "plateau_factor", "plateau_patience",
        "early_stopping_patience", "class_weights")
OPTIMISERS = ("sgd", "adam")
SCHEDULES = ("poly", "plateau")


@dataclass(frozen=True)
class Objective:
    loss: str = "dice_ce"
    optimiser: str = "sgd"
    lr: float | None = None  # None: the trainer's default (TrainOptions.initial_lr)
    weight_decay: float | None = None
    momentum: float | None = None
    schedule: str = "poly"
    plateau_factor: float = 0.5
    plateau_patience: int = 3
    early_stopping_patience: int | None = None
    class_weights: tuple[float, ...] | None = None

    @classmethod
    def of(cls, training: Mapping[str, Any], where: str = "configuration") -> Objective:
        unknown = sorted(set(training) - set(KEYS))
        if unknown:
            raise PlanError(f"{where}: unknown training option(s) {', '.join(unknown)}; known: {', '.join(KEYS)}")
        t = dict(training)
        if "class_weights" in t and t["class_weights"] is not None:
            t["class_weights"] = tuple(float(w) for w in t["class_weights"])
        obj = cls(**t)
        if obj.loss not in LOSSES or obj.optimiser not in OPTIMISERS or obj.schedule not in SCHEDULES:
            raise PlanError(f"{where}: training needs loss in {LOSSES}, optimiser in {OPTIMISERS}, schedule in {SCHEDULES}; "
                            f"got {obj.loss!r}, {obj.optimiser!r}, {obj.schedule!r}")
        if obj.lr is not None and not (math.isfinite(obj.lr) and obj.lr > 0):
            raise PlanError(f"{where}: training lr must be a positive number, got {obj.lr}")
        if not 0 < obj.plateau_factor < 1 or obj.plateau_patience < 0:
            raise PlanError(f"{where}: plateau_factor must be in (0, 1) and plateau_patience >= 0")
        if obj.early_stopping_patience is not None and obj.early_stopping_patience < 1:
            raise PlanError(f"{where}: early_stopping_patience must be >= 1")
        if obj.loss == "ce_median_frequency" and not obj.class_weights:
            raise PlanError(f"{where}: the ce_median_frequency loss needs training.class_weights (added with the recipe)")
        return obj

    def make_loss(self, n_levels: int, batch_dice: bool = True) -> DeepSupervisionLoss:
        return DeepSupervisionLoss(n_levels, batch_dice, kind=self.loss, class_weights=self.class_weights)

    def initial_lr(self, default: float) -> float:
        return float(self.lr) if self.lr is not None else float(default)

    def make_optimiser(self, params: Iterable[torch.nn.Parameter], default_lr: float, default_weight_decay: float,
                       default_momentum: float) -> torch.optim.Optimizer:
        lr = self.initial_lr(default_lr)
        wd = default_weight_decay if self.weight_decay is None else float(self.weight_decay)
        if self.optimiser == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=wd)
        momentum = default_momentum if self.momentum is None else float(self.momentum)
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=wd)


class Plateau:
    """Reduce-on-plateau (multiply the learning rate by ``factor`` after ``patience`` epochs
    without a better validation loss) and early stopping (stop after ``stop_patience`` epochs
    without one). ``step(val_loss)`` once per epoch; ``lr`` is the rate to use next."""

    def __init__(self, initial_lr: float, factor: float = 0.5, patience: int = 3, stop_patience: int | None = None,
                 min_delta: float = 1e-4):
        self.lr, self.factor, self.patience, self.stop_patience, self.min_delta = float(initial_lr), factor, patience, stop_patience, min_delta
        self.best: float | None = None
        self.since_best = 0
        self.since_reduce = 0

    def step(self, val_loss: float | None) -> None:
        if val_loss is None or not math.isfinite(val_loss):
            return
        if self.best is None or val_loss < self.best - self.min_delta:
            self.best, self.since_best, self.since_reduce = float(val_loss), 0, 0
            return
        self.since_best += 1
        self.since_reduce += 1
        if self.since_reduce > self.patience:
            self.lr *= self.factor
            self.since_reduce = 0

    @property
    def should_stop(self) -> bool:
        return self.stop_patience is not None and self.since_best >= self.stop_patience

    def state_dict(self) -> dict:
        return {"lr": self.lr, "best": self.best, "since_best": self.since_best, "since_reduce": self.since_reduce}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.lr, self.best = float(state["lr"]), state.get("best")
        self.since_best, self.since_reduce = int(state.get("since_best", 0)), int(state.get("since_reduce", 0))
