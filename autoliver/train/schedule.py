"""Learning-rate schedules and the wall-clock budget.

``poly_lr``: nnU-Net's polynomial decay, lr0 * (1 - epoch / max_epochs) ** 0.9, set at the
start of each epoch.

``BudgetPlan`` (``--budget-minutes``): the number of epochs is not given but derived from the
measured speed. After every epoch the plan is re-estimated from the mean epoch time so far:
planned = done + floor(remaining training time / mean epoch time), and the poly schedule
runs over ``planned`` epochs, so it reaches ~0 as the budget ends whether the machine turned
out faster or slower than first thought. A share of the budget (``reserve``) is kept for the
final validation. When the first measured epoch would leave fewer than ``min_epochs`` epochs
the epochs are shortened (fewer iterations each) so that the schedule still has that many
steps. Training time spent in earlier runs (``--continue``) counts against the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

POLY_EXPONENT = 0.9


def poly_lr(epoch: int, max_epochs: int, initial_lr: float, exponent: float = POLY_EXPONENT) -> float:
    """Learning rate for ``epoch`` (0-based) of ``max_epochs``."""
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be >= 1, got {max_epochs}")
    frac = min(max(epoch, 0), max_epochs) / max_epochs
    return initial_lr * (1.0 - frac) ** exponent


@dataclass(frozen=True)
class BudgetPlan:
    """Epoch plan for a wall-clock budget; immutable, re-estimated with ``update``."""

    budget_s: float
    max_epochs: int  # upper bound (the --epochs value)
    iters_per_epoch: int
    planned_epochs: int
    reserve: float = 0.1  # share of the budget kept for final validation and checkpoints
    min_epochs: int = 10
    val_iters: int = 0  # pseudo-Dice batches per epoch: they cost time too
    val_cost: float = 0.35  # one validation batch (forward only) in training iterations
    final_s: float = 0.0  # estimated time of the end-of-fold validation (whole cases)

    @classmethod
    def start(cls, budget_s: float, max_epochs: int, iters_per_epoch: int, reserve: float = 0.1, min_epochs: int = 10, val_iters: int = 0) -> "BudgetPlan":
        if budget_s <= 0:
            raise ValueError(f"the budget must be positive, got {budget_s} s")
        if not 0 <= reserve < 1:
            raise ValueError(f"reserve must be in [0, 1), got {reserve}")
        return cls(budget_s, max_epochs, iters_per_epoch, max_epochs, reserve, min_epochs, val_iters)

    @property
    def training_s(self) -> float:
        """Budget left for training: the reserve or the estimated final validation, whichever is
        larger — but at least half the budget, so a slow validation cannot eat all training."""
        return self.budget_s - min(max(self.budget_s * self.reserve, self.final_s), 0.5 * self.budget_s)

    def fit_iterations(self, seconds_per_iter: float) -> "BudgetPlan":
        """Shorten epochs when the budget holds fewer than ``min_epochs`` of them at this speed.

        An epoch costs its training iterations plus its validation batches (``val_cost`` of an
        iteration each); both are shortened by the same factor.
        """
        if seconds_per_iter <= 0:
            return self
        epoch_s = seconds_per_iter * (self.iters_per_epoch + self.val_iters * self.val_cost)
        epochs_fit = self.training_s / epoch_s
        if epochs_fit >= self.min_epochs:
            return self
        factor = epochs_fit / self.min_epochs
        iters = max(1, int(self.iters_per_epoch * factor))
        val_iters = max(1, int(self.val_iters * factor)) if self.val_iters else 0
        return replace(self, iters_per_epoch=min(iters, self.iters_per_epoch), val_iters=min(val_iters, self.val_iters))

    def update(self, epochs_done: int, elapsed_s: float, mean_epoch_s: float) -> "BudgetPlan":
        """Re-estimate the number of epochs from the time used and the mean epoch time."""
        remaining = self.training_s - elapsed_s
        more = int(math.floor(remaining / mean_epoch_s)) if mean_epoch_s > 0 else 0
        planned = min(self.max_epochs, max(epochs_done, epochs_done + more))
        return replace(self, planned_epochs=planned)

    def to_json(self) -> dict:
        return {"budget_s": self.budget_s, "max_epochs": self.max_epochs, "iters_per_epoch": self.iters_per_epoch,
                "planned_epochs": self.planned_epochs, "reserve": self.reserve, "min_epochs": self.min_epochs,
                "val_iters": self.val_iters, "val_cost": self.val_cost, "final_s": self.final_s}

    @classmethod
    def from_json(cls, d: dict) -> "BudgetPlan":
        return cls(float(d["budget_s"]), int(d["max_epochs"]), int(d["iters_per_epoch"]), int(d["planned_epochs"]), float(d["reserve"]), int(d["min_epochs"]),
                   int(d.get("val_iters", 0)), float(d.get("val_cost", 0.35)), float(d.get("final_s", 0.0)))
