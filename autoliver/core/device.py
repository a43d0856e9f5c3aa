"""The compute device, chosen in one place for training and prediction."""

from __future__ import annotations

import torch

from autoliver.core.errors import AutoliverError, UsageError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def select_device(choice: str, local_rank: int = 0) -> torch.device:
    """'auto' (CUDA when present), 'cpu' or 'cuda'; under DDP each process takes the GPU of its
    local rank."""
    if choice not in DEVICE_CHOICES:
        raise UsageError(f"device must be auto, cpu or cuda, got {choice!r}")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise AutoliverError("--device cuda: no CUDA device is available here; use --device cpu or auto")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")
