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
truncated (the pickle stream cannot be read to its end), and a complete file that
``weights_only`` loading refuses because it holds Python objects (a ``__reduce__`` payload, a
class instance): such a file is reported as unsafe and nothing in it is run.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import pickletools
import random
import zipfile
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
SAFE_MODULES = ("torch", "collections", "_codecs")  # what torch's own checkpoints name (tensors, OrderedDict, bytes)
LEGACY_PICKLES = 5  # a legacy (non-zip) torch file: magic number, protocol, system info, object, storage keys


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically (temporary file in the same folder, fsync, rename)."""
    state = dict(state, format_version=FORMAT_VERSION)
    with atomic_path(path, suffix=".pt") as tmp:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        faults.point("checkpoint.before_rename")


def _pickle_streams(path: Path) -> list[bytes]:
    """The pickled part of a checkpoint file: ``*/data.pkl`` of a zip checkpoint (its CRC is
    checked), else the file itself (the legacy format starts with a few pickles)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return [z.read(n) for n in z.namelist() if n.endswith("data.pkl")]
    return [path.read_bytes()]


def _named_globals(data: bytes, max_pickles: int = LEGACY_PICKLES) -> list[str]:
    """module.name of every global the pickles at the start of ``data`` name; parsing only
    (``pickletools.genops`` builds and calls nothing). ValueError when a pickle is cut short."""
    stream = io.BytesIO(data)
    names: list[str] = []
    for _ in range(max_pickles):
        if stream.tell() >= len(data):
            break
        strings: list[str] = []
        for op, arg, _pos in pickletools.genops(stream):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(str(arg))
            elif op.name in ("GLOBAL", "INST"):
                names.append(str(arg).replace(" ", ".").replace("__builtin__.", "builtins."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
    return names


def foreign_globals(path: Path) -> list[str] | None:
    """Python objects (module.name) a complete checkpoint names beyond torch's own; None when
    its pickles cannot be parsed to their end (damaged or truncated)."""
    try:
        streams = _pickle_streams(path)
        names = [n for data in streams for n in _named_globals(data)]
    except (ValueError, EOFError, OSError, zipfile.BadZipFile, pickle.UnpicklingError, RuntimeError):
        return None
    if not streams:
        return None
    return [n for n in dict.fromkeys(names) if n.split(".")[0] not in SAFE_MODULES]


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
        if isinstance(exc, pickle.UnpicklingError):
            names = foreign_globals(path)
            if names:  # complete pickles that name Python objects: weights_only refused them
                shown = f" ({', '.join(names[:3])})"
                raise CheckpointError(f"{path}: refused as unsafe (it holds Python objects that would run code when loaded){shown}; "
                                      f"nothing in it was run. Use only checkpoints written by autoliver; delete it, or retrain the fold") from None
        if isinstance(exc, pickle.UnpicklingError):  # torch's message is about weights_only; the cause here is damage
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
