"""Training options: one frozen dataclass, filled by the CLI or by a caller of ``api.train``.

Variants (epochs, network family, budget, device) are values here, never subclasses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from autoliver.core.errors import UsageError

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class TrainOptions:
    epochs: int = 1000
    iters_per_epoch: int = 250
    val_iters: int = 50  # validation batches per epoch for the pseudo-Dice
    device: str = "auto"  # auto: CUDA when available
    resume: bool = False  # --continue
    arch: str | None = None  # None: the plan's (configuration.extra["arch"]) else "unet"
    splits_file: Path | None = None
    seed: int = 0
    budget_minutes: float | None = None
    n_workers: int = 2  # data-loading worker processes (0: in the main process)
    progress: bool = True
    initial_lr: float = 1e-2
    weight_decay: float = 3e-5
    momentum: float = 0.99
    grad_clip: float = 12.0
    amp: bool = True  # mixed precision (float16 + grad scaling) on CUDA; ignored on CPU
    cpu_bf16: bool = False  # bfloat16 autocast on CPU
    oversample_foreground: float = 0.33
    tumour_share: float | None = None  # None: the data loader's default
    batch_dice: bool = True
    val_step: float = 0.5  # sliding-window step (fraction of the patch) for the final validation
    save_probabilities: bool = True
    final_validation: bool = True
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    encoder_weights: Path | None = None  # a local weight file for the network's encoder (weights only, never unpickled)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise UsageError(f"--epochs must be >= 1, got {self.epochs}")
        if self.iters_per_epoch < 1:
            raise UsageError(f"--iters-per-epoch must be >= 1, got {self.iters_per_epoch}")
        if self.val_iters < 0:
            raise UsageError(f"val_iters must be >= 0, got {self.val_iters}")
        if self.device not in DEVICES:
            raise UsageError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.budget_minutes is not None and not self.budget_minutes > 0:
            raise UsageError(f"--budget-minutes must be positive, got {self.budget_minutes}")
        if self.n_workers < 0:
            raise UsageError(f"--workers must be >= 0, got {self.n_workers}")
        if not 0 < self.val_step <= 1:
            raise UsageError(f"val_step must be in (0, 1], got {self.val_step}")
        if not 0 <= self.oversample_foreground <= 1:
            raise UsageError(f"oversample_foreground must be in [0, 1], got {self.oversample_foreground}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["splits_file"] = None if self.splits_file is None else str(self.splits_file)
        d["encoder_weights"] = None if self.encoder_weights is None else str(self.encoder_weights)
        return d
