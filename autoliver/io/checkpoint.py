"""Checkpoints: atomic saves, safe loads, and the random-number-generator states.

A checkpoint is a dict of tensors and plain Python values only (no pickled objects), so it
loads with ``torch.load(..., weights_only=True)``:

    format_version, epoch (epochs completed), weights, optimiser, grad_scaler (or None),
    rng {torch, numpy, python, cuda}, plans_hash, configuration (dict), options (dict),
    history (one dict per epoch, the log.jsonl lines), best_ema, train_seconds, budget (dict
    or None), network (arch name and spec as a dict)

It is written to a temporary file in the same folder and renamed, so a crash (SIGKILL,
power loss) leaves the previous checkpoint intact, never half of one.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoliver.core.errors import CheckpointError
from autoliver.io.atomic import atomic_path

FORMAT_VERSION = 1


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically (temporary file in the same folder, fsync, rename)."""
    state = dict(state, format_version=FORMAT_VERSION)
    with atomic_path(path, suffix=".pt") as tmp:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a damaged file raises CheckpointError."""
    path = Path(path)
    fix = f"delete it to start the fold again, or restore it from a copy (checkpoint_best.pt / checkpoint_final.pt in {path.parent} may still be intact)"
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, zip errors...
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: damaged or truncated checkpoint ({reason}); {fix}") from None
    if not isinstance(state, dict) or "weights" not in state or "epoch" not in state:
        raise CheckpointError(f"{path}: not an autoliver checkpoint (no weights/epoch); {fix}")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {state.get('format_version')!r}, expected {FORMAT_VERSION}; retrain the fold")
    return state


def capture_rng_states() -> dict[str, Any]:
    """torch, numpy (legacy global), python and CUDA generator states as tensors/ints."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if states.get("cuda") and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
