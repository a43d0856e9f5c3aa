"""Checkpoints: atomic saves, safe loads, and the random-number-generator states.

A checkpoint is a dict of tensors and plain Python values only (no pickled objects), so it
loads with ``torch.load(..., weights_only=True)``:

    format_version, epoch (epochs completed), weights, optimiser, grad_scaler (or None),
    rng {torch, numpy, python, cuda}, data_position {train_batches, val_batches} (batches
    each data stream has delivered: a resumed run's loaders start there), plans_hash,
    configuration (dict), options (dict), history (one dict per epoch, the log.jsonl lines),
    best_ema, train_seconds, budget (dict or None), network (arch name and spec as a dict)

Format 1 (no data_position) still loads for prediction; ``check_resumable`` refuses to
resume it, because its data streams cannot be restarted where they stopped.

It is written to a temporary file in the same folder and renamed, so a crash (SIGKILL,
power loss) leaves the previous checkpoint intact, never half of one; the temporary file a
crash leaves behind is removed by ``autoliver.io.atomic.remove_stale_temporaries`` (the
trainer calls it on the fold's folders when it starts).

Loading tells three failures apart: a file that is not there, a file that is damaged or
truncated (it cannot be read to its end), and a file that ``weights_only`` loading refuses
because it holds Python objects (a ``__reduce__`` payload, a class instance; torch's error names
them): such a file is reported as unsafe and nothing in it is run.
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoliver.core import faults
from autoliver.core.errors import CheckpointError
from autoliver.io.atomic import atomic_path

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
LOADABLE_VERSIONS = (1, 2)  # format 1: written before the data-stream positions were recorded
_REFUSED = re.compile(r"Unsupported (?:global|class):? (?:GLOBAL )?([A-Za-z_][\w.]*)")  # torch's weights-only refusal


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically (temporary file in the same folder, fsync, rename)."""
    state = dict(state, format_version=FORMAT_VERSION)
    with atomic_path(path, suffix=".pt") as tmp:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        faults.point("checkpoint.before_rename")


def refused_globals(exc: BaseException) -> list[str]:
    """The Python objects (module.name) that ``torch.load(weights_only=True)`` refused to build,
    read from its error; empty when the error is anything else (a damaged or truncated file).
    torch names a builtin without its module (``exec``): it is given as ``builtins.exec``."""
    names = _REFUSED.findall(str(exc))
    return list(dict.fromkeys(n if "." in n else f"builtins.{n}" for n in names))


def foreign_globals(path: Path) -> list[str] | None:
    """Python objects (module.name) a checkpoint holds that weights-only loading refuses; [] for
    a checkpoint of tensors and plain values; None when it cannot be read (damaged or truncated).
    Only ``torch.load(weights_only=True)`` touches the file: nothing in it is built or run."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every way the file can fail says the same here
        return refused_globals(exc) or None
    return []


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; CheckpointError when it is missing,
    damaged or truncated, refused as unsafe, or not an autoliver checkpoint."""
    path = Path(path)
    fix = f"delete it to start the fold again, or restore it from a copy (checkpoint_best.pt / checkpoint_final.pt in {path.parent} may still be intact)"
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, zip errors...
        names = refused_globals(exc)
        if names:  # Python objects weights_only loading refused to build
            shown = f" ({', '.join(names[:3])})"
            raise CheckpointError(f"{path}: refused as unsafe (it holds Python objects that would run code when loaded){shown}; "
                                  f"nothing in it was run. Use only checkpoints written by autoliver; delete it, or retrain the fold") from None
        if "weights" in str(exc).lower() and "unpickler" in str(exc).lower():  # torch blames weights_only; the cause is damage
            reason = "its pickled data cannot be read to the end"
        else:
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: damaged or truncated checkpoint ({reason}); {fix}") from None
    if not isinstance(state, dict) or "weights" not in state or "epoch" not in state:
        raise CheckpointError(f"{path}: not an autoliver checkpoint (no weights/epoch); {fix}")
    version = state.get("format_version")
    if version not in LOADABLE_VERSIONS:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        hint = "written by a newer autoliver; upgrade autoliver to read it" if newer else "retrain the fold"
        raise CheckpointError(f"{path}: checkpoint format {version!r}, this autoliver reads {', '.join(map(str, LOADABLE_VERSIONS))}; {hint}")
    return state


def check_resumable(path: Path, state: dict[str, Any]) -> None:
    """Refuse to resume from a checkpoint that cannot be resumed exactly (format 1)."""
    if state.get("format_version") != FORMAT_VERSION or not isinstance(state.get("data_position"), dict):
        raise CheckpointError(
            f"{path}: checkpoint format {state.get('format_version')!r} from an older autoliver records no data-stream positions, "
            f"so --continue cannot resume it exactly; train the fold again without --continue after moving {Path(path).parent} "
            f"aside (its checkpoint_final.pt, if any, still predicts)")


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
