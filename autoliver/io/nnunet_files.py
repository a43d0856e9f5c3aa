"""The files of a trained nnU-Net v2 model: its folder, its export zip, its checkpoints.

A model folder is named ``<Trainer>__<Plans>__<configuration>`` and holds ``plans.json``
(with ``configurations`` and ``dataset_name``), ``dataset.json`` and ``fold_<k>/`` with
``checkpoint_final.pth`` (else ``checkpoint_best.pth``). ``nnUNetv2_export_model_to_zip``
packs one or more of them, possibly under ``DatasetNNN_Name/``.

Checkpoints are read with ``torch.load(weights_only=True)`` only: tensors and plain values,
plus numpy scalars and dtypes (nnU-Net's training log holds a few), nothing else. A file that
needs anything more is refused as unsafe: it is never unpickled.

The zip is extracted (``extract_zip``) by ``autoliver.io.archive.safe_extract`` only when every
member is a plain file or folder with a relative path that stays inside the target (no absolute
path, no ``..``, no symlink) and the total size and member count are below limits; it goes into
a cache folder named by the zip's content hash, written under a temporary name and renamed when
complete.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from autoliver.core.errors import CheckpointError, MissingArtefactError, UsageError
from autoliver.io.archive import ArchiveLimits, safe_extract
from autoliver.io.checkpoint import refused_globals
from autoliver.io.jsonfile import read_json as _read_json

log = logging.getLogger(__name__)

CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_best.pth")
MAX_ZIP_BYTES = 8 * 2**30
MAX_ZIP_FILES = 10_000


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that would need arbitrary code to load; it was not unpickled."""


def _numpy_globals() -> list:
    """The numpy callables nnU-Net checkpoints need besides tensors: scalar reconstruction and dtypes."""
    out: list = [np.dtype]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            out.append(__import__(mod, fromlist=["scalar"]).scalar)
            break
        except (ImportError, AttributeError):
            continue
    out += [getattr(np.dtypes, n) for n in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType")
            if hasattr(np, "dtypes") and hasattr(np.dtypes, n)]
    return out


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """An nnU-Net checkpoint (dict) read with ``weights_only=True``; refused when unsafe or damaged."""
    path = Path(path)
    if not path.is_file():
        raise MissingArtefactError(f"{path}: checkpoint not found")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - refused as unsafe, else damaged (below)
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        names = refused_globals(exc)
        if names:
            raise UnsafeCheckpointError(f"{path}: refused as unsafe: it holds Python objects other than tensors and plain values "
                                        f"({', '.join(names[:3])}), which could run code when loaded; nothing was executed. "
                                        "Use a checkpoint saved by nnU-Net's own trainer, or re-save its network_weights alone") from None
        raise CheckpointError(f"{path}: damaged or truncated checkpoint ({first}); copy it again from the training machine") from None
    if not isinstance(state, dict) or not isinstance(state.get("network_weights"), dict):
        raise CheckpointError(f"{path}: not an nnU-Net v2 checkpoint (no network_weights); point -m at the folder nnUNetv2_train wrote")
    return state


def read_json(path: Path, what: str) -> dict:
    if not Path(path).is_file():
        raise MissingArtefactError(f"{path}: {what} not found; an nnU-Net model folder holds plans.json, dataset.json and fold_K/")
    data = _read_json(path, UsageError, "copy the model folder again")
    if not isinstance(data, dict):
        raise UsageError(f"{path}: {what} is not a JSON object")
    return data


def is_model_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is one nnU-Net v2 model folder (plans.json with ``configurations`` and
    ``dataset_name``, dataset.json, a ``fold_*/checkpoint_*.pth``)."""
    path = Path(path)
    plans = path / "plans.json"
    if not (plans.is_file() and (path / "dataset.json").is_file() and any(path.glob("fold_*/checkpoint_*.pth"))):
        return False
    try:
        data = _read_json(plans, UsageError)
    except UsageError:
        return False
    return isinstance(data, dict) and "configurations" in data and "dataset_name" in data


def find_model_folders(root: str | os.PathLike, depth: int = 3) -> list[Path]:
    """Model folders at ``root`` or up to ``depth`` levels below it, sorted."""
    root = Path(root)
    if is_model_folder(root):
        return [root]
    found: list[Path] = []
    level = [root]
    for _ in range(depth):
        nxt = []
        for d in level:
            for child in sorted(p for p in d.iterdir() if p.is_dir() and not p.is_symlink()) if d.is_dir() else []:
                (found if is_model_folder(child) else nxt).append(child)
        level = nxt
    return sorted(found)


def zip_has_model(path: str | os.PathLike) -> bool:
    """Whether a zip lists a ``plans.json`` next to a ``dataset.json`` and a ``fold_*/`` (read from its index only)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [PurePosixPath(n) for n in zf.namelist()]
    except (OSError, zipfile.BadZipFile):
        return False
    parents = {n.parent for n in names if n.name == "plans.json"}
    return any(p / "dataset.json" in names and any(n.parent.parent == p and n.parent.name.startswith("fold_") for n in names)
               for p in parents)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:20]


def extract_zip(zip_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, max_bytes: int = MAX_ZIP_BYTES,
                max_files: int = MAX_ZIP_FILES) -> Path:
    """Extract an exported model zip with the project's safe extractor (``autoliver.io.archive``:
    no absolute or escaping paths, no links, bounded size and count, all or nothing) into a
    cache folder named by the zip's content hash, and return it; an earlier extraction of the
    same content is reused."""
    zip_path = Path(zip_path)
    if not zipfile.is_zipfile(zip_path):
        raise UsageError(f"{zip_path}: not a readable zip; export the model with nnUNetv2_export_model_to_zip")
    cache = Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir()) / "autoliver_nnunet_models"
    target = cache / _digest(zip_path)
    if target.is_dir():
        return target
    limits = ArchiveLimits(max_total_bytes=max_bytes, max_member_bytes=max_bytes, max_members=max_files)
    safe_extract(zip_path, target, limits)
    log.info("extracted %s to %s", zip_path, target)
    return target
