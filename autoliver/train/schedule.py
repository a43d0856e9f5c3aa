"""Learning-rate schedules and the wall-clock budget.

``poly_lr``: nnU-Net's polynomial decay, lr0 * (1 - step / max_steps) ** 0.9. With a fixed
number of epochs it is set once per epoch (step = epoch); under a budget it is set every
iteration over the planned total of iterations, so it reaches ~0 with the last iteration
whatever length the last epoch was given.

``BudgetPlan`` (``--budget-minutes``): the number of epochs is not given but derived from the
measured speed. Early in the first epoch the time of a few iterations fixes the epoch length
(``fit_iterations``: epochs are shortened when fewer than ``min_epochs`` of them would fit).
After every epoch ``refit`` plans the rest from the time used so far, the measured seconds per
training iteration and the measured time each epoch spends besides its iterations (pseudo-Dice
batches, checkpoints, log): as many full epochs as fit, and the remainder given to the last
epoch, which is shortened (fewer iterations), or lengthened when the remainder is too small
for an epoch of its own, so that training ends within an iteration of the time it has.

The time after the last epoch (the final checkpoint and the end-of-fold validation, estimated
from the measured forward time of one patch) is kept back (``final_s``); until it has been
estimated, a share ``reserve`` of the budget is. Time spent in earlier runs of the fold
(``--continue``) counts against the budget. All times come from the trainer's clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

POLY_EXPONENT = 0.9
MAX_FINAL_SHARE = 0.8  # the time after the last epoch is given at most this share of the budget; training the rest
SHORT_EPOCH_MIN = 0.25  # a last epoch of its own needs this share of a full epoch's iterations, else the previous one is lengthened


def poly_lr(epoch: int, max_epochs: int, initial_lr: float, exponent: float = POLY_EXPONENT) -> float:
    """Learning rate for step ``epoch`` (0-based) of ``max_epochs`` (epochs or iterations)."""
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be >= 1, got {max_epochs}")
    frac = min(max(epoch, 0), max_epochs) / max_epochs
    return initial_lr * (1.0 - frac) ** exponent


@dataclass(frozen=True)
class BudgetPlan:
    """Epoch plan for a wall-clock budget; immutable, re-estimated with ``refit``."""

    budget_s: float
    max_epochs: int  # upper bound (the --epochs value)
    iters_per_epoch: int
    planned_epochs: int
    reserve: float = 0.1  # share of the budget kept for the final validation until its time is estimated
    min_epochs: int = 10
    val_iters: int = 0  # pseudo-Dice batches per epoch: they cost time too
    val_cost: float = 0.35  # one validation batch (forward only) in training iterations, until measured
    final_s: float = 0.0  # estimated time after the last epoch: final checkpoint and end-of-fold validation
    final_known: bool = False  # final_s is an estimate (else the reserve applies)
    last_iters: int = 0  # iterations of the last planned epoch (0: iters_per_epoch)
    s_per_iter: float = 0.0  # measured seconds per training iteration (0: not yet)
    epoch_overhead_s: float = 0.0  # measured seconds per epoch besides its training iterations

    @classmethod
    def start(cls, budget_s: float, max_epochs: int, iters_per_epoch: int, reserve: float = 0.1, min_epochs: int = 10, val_iters: int = 0) -> "BudgetPlan":
        if budget_s <= 0:
            raise ValueError(f"the budget must be positive, got {budget_s} s")
        if not 0 <= reserve < 1:
            raise ValueError(f"reserve must be in [0, 1), got {reserve}")
        return cls(budget_s, max_epochs, iters_per_epoch, max_epochs, reserve, min_epochs, val_iters)

    @property
    def training_s(self) -> float:
        """Budget for training (every epoch, its checkpoints included): the budget less the
        estimated time after the last epoch (before the estimate: less the reserve or the
        estimate, whichever is larger) -- but at least 1 - MAX_FINAL_SHARE of the budget, so
        that a slow validation cannot eat all training (the budget is then overrun)."""
        held = self.final_s if self.final_known else max(self.budget_s * self.reserve, self.final_s)
        return self.budget_s - min(held, MAX_FINAL_SHARE * self.budget_s)

    def epoch_iters(self, epoch: int) -> int:
        """Training iterations of ``epoch`` (0-based) in this plan."""
        if self.last_iters and epoch == self.planned_epochs - 1:
            return self.last_iters
        return self.iters_per_epoch

    def total_iters(self, epoch: int, iters_done: int) -> int:
        """Iterations of the whole run: ``iters_done`` before ``epoch``, then the plan's."""
        left = self.planned_epochs - epoch
        if left <= 0:
            return max(iters_done, 1)
        return iters_done + (left - 1) * self.iters_per_epoch + self.epoch_iters(self.planned_epochs - 1)

    def fit_iterations(self, seconds_per_iter: float) -> "BudgetPlan":
        """First estimate from the measured seconds per iteration: shorten the epochs when the
        training time holds fewer than ``min_epochs`` (at most ``max_epochs``) of them, and plan
        as many epochs as fit.

        An epoch costs its training iterations plus its validation batches (``val_cost`` of an
        iteration each); both are shortened by the same factor.
        """
        if seconds_per_iter <= 0:
            return self
        plan = replace(self, s_per_iter=seconds_per_iter)
        epoch_s = seconds_per_iter * (self.iters_per_epoch + self.val_iters * self.val_cost)
        want = min(self.min_epochs, self.max_epochs)
        epochs_fit = self.training_s / epoch_s
        if epochs_fit < want:
            factor = epochs_fit / want
            iters = max(1, int(self.iters_per_epoch * factor))
            val_iters = max(1, int(self.val_iters * factor)) if self.val_iters else 0
            plan = replace(plan, iters_per_epoch=min(iters, self.iters_per_epoch), val_iters=min(val_iters, self.val_iters))
            epoch_s = seconds_per_iter * (plan.iters_per_epoch + plan.val_iters * plan.val_cost)
        return replace(plan, planned_epochs=min(self.max_epochs, max(1, int(self.training_s // epoch_s))), last_iters=0)

    def refit(self, epochs_done: int, used_s: float, s_per_iter: float, overhead_s: float) -> "BudgetPlan":
        """Plan the epochs after ``epochs_done``, which used ``used_s`` seconds of the budget, at
        ``s_per_iter`` seconds per training iteration and ``overhead_s`` per epoch besides.

        Full epochs while they fit; the time left then goes to one more, shorter epoch when it
        holds at least ``SHORT_EPOCH_MIN`` of an epoch's iterations (or when no full epoch
        fits), else to more iterations in the last full epoch. Never fewer epochs than done,
        never more than ``max_epochs``.
        """
        s = s_per_iter if s_per_iter > 0 else self.s_per_iter
        o = max(0.0, overhead_s)
        plan = replace(self, s_per_iter=s, epoch_overhead_s=o)
        if s <= 0:
            return plan
        if epochs_done >= self.max_epochs:
            return replace(plan, planned_epochs=epochs_done, last_iters=0)
        iters = self.iters_per_epoch
        remaining = self.training_s - used_s
        full = s * iters + o
        n = int(remaining // full) if remaining > 0 else 0
        if epochs_done + n >= self.max_epochs:
            return replace(plan, planned_epochs=self.max_epochs, last_iters=0)
        spare = remaining - n * full
        short = int((spare - o) // s) if spare > o else 0  # iterations of one more epoch
        if short >= max(1, math.ceil(SHORT_EPOCH_MIN * iters)) or (n == 0 and short >= 1):
            return replace(plan, planned_epochs=epochs_done + n + 1, last_iters=min(short, iters))
        if n >= 1:
            longer = iters + max(0, int(spare // s))
            return replace(plan, planned_epochs=epochs_done + n, last_iters=0 if longer == iters else longer)
        if epochs_done:
            return replace(plan, planned_epochs=epochs_done, last_iters=0)
        return replace(plan, planned_epochs=1, last_iters=1)  # at least one iteration is trained

    def to_json(self) -> dict:
        return {"budget_s": self.budget_s, "max_epochs": self.max_epochs, "iters_per_epoch": self.iters_per_epoch,
                "planned_epochs": self.planned_epochs, "reserve": self.reserve, "min_epochs": self.min_epochs,
                "val_iters": self.val_iters, "val_cost": self.val_cost, "final_s": self.final_s, "final_known": self.final_known,
                "last_iters": self.last_iters, "s_per_iter": self.s_per_iter, "epoch_overhead_s": self.epoch_overhead_s}

    @classmethod
    def from_json(cls, d: dict) -> "BudgetPlan":
        return cls(float(d["budget_s"]), int(d["max_epochs"]), int(d["iters_per_epoch"]), int(d["planned_epochs"]), float(d["reserve"]), int(d["min_epochs"]),
                   int(d.get("val_iters", 0)), float(d.get("val_cost", 0.35)), float(d.get("final_s", 0.0)), bool(d.get("final_known", False)),
                   int(d.get("last_iters", 0)), float(d.get("s_per_iter", 0.0)), float(d.get("epoch_overhead_s", 0.0)))
