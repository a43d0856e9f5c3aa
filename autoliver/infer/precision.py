"""Numerical precision of the network at inference: ``auto``, ``fp32``, ``bf16`` or ``fp16``.

``auto`` picks float16 autocast on CUDA; on a CPU, bfloat16 autocast only where the CPU has
native bfloat16 arithmetic (AVX512-BF16 or AMX), since emulated bfloat16 is far slower than
float32 (30x slower for the 3d_fullres network on this project's AVX2-only development CPU:
benchmarks/bench_flops.py); float32 otherwise. The sliding-window stitching and the softmax stay float32 whatever the choice.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from autoliver.core.errors import UsageError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags of the first processor in ``cpuinfo`` (empty when unreadable)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_has_native_bf16(flags: set[str] | None = None) -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX)."""
    flags = cpu_flags() if flags is None else flags
    if any(f in flags for f in BF16_FLAGS):
        return True
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    return "AMX" in str(capability).upper()


def resolve_precision(precision: str, device: torch.device | str, flags: set[str] | None = None) -> str:
    """``auto`` -> the concrete precision for ``device`` (module docstring); others unchanged."""
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    kind = torch.device(device).type
    if kind == "cuda":
        return "fp16"
    if kind == "cpu" and cpu_has_native_bf16(flags):
        return "bf16"
    return "fp32"


def autocast_dtype(precision: str, device: torch.device | str, flags: set[str] | None = None) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: plain float32)."""
    return DTYPES[resolve_precision(precision, device, flags)]
