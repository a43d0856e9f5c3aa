"""The exported-engine cache: one folder per key next to the weights, published atomically.

An exported network (an ONNX file, an OpenVINO IR pair) lives in
``<fold_dir>/.engine_cache/<key>/`` with an ``engine.json`` that records what it was built
from. The key is a hash of everything the export depends on (``engine_key``): the weights'
sha256 (and the checkpoint file's, when there is one), the module's structure, the input
shape (N, C, *patch), the ONNX opset, the engine and its version, torch's version and this
cache's format version. A changed checkpoint gives another key, so a stale export is never
used; ``prune_stale`` removes the entries of the same checkpoint built from other weights.

``cached_build`` builds an entry in a hidden temporary folder (named like the temporaries of
``autoliver.io.atomic``, so ``remove_stale_temporaries`` clears a killed build's leftovers)
and renames it onto ``<key>/``; ``engine.json`` is written last, inside the temporary folder,
so a visible entry is always complete. When two processes build the same key at once, the
first rename wins and the other process discards its copy and uses the winner's: an entry is
never replaced while another process may be reading it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from autoliver.io.atomic import remove_stale_temporaries, temporary_dir

log = logging.getLogger(__name__)

CACHE_DIR_NAME = ".engine_cache"
META_NAME = "engine.json"
CACHE_FORMAT = 1  # bump when the files an entry holds change meaning


def cache_dir_for(checkpoint: str | os.PathLike) -> Path:
    """``<folder of checkpoint>/.engine_cache``: where a fold's exported engines live."""
    return Path(checkpoint).parent / CACHE_DIR_NAME


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def weights_sha256(network: torch.nn.Module) -> str:
    """sha256 over the state dict: every entry's name, dtype, shape and values, in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(network.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)  # 0-dim entries (BatchNorm counters) too
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def structure_sha256(network: torch.nn.Module) -> str:
    """sha256 of what the weights do not say: the module tree (its repr) and the output mode
    (``deep_supervision``: a list of outputs or one)."""
    text = f"{type(network).__module__}.{type(network).__qualname__}|{network!r}|ds={getattr(network, 'deep_supervision', None)}"
    return hashlib.sha256(text.encode()).hexdigest()


def engine_key(fields: dict) -> str:
    """A short stable hash (24 hex digits) of ``fields`` (JSON-able): the entry's folder name."""
    text = json.dumps({**fields, "cache_format": CACHE_FORMAT}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def key_fields(network: torch.nn.Module, input_shape: Sequence[int], opset: int, engine: str, engine_version: str,
               checkpoint: str | os.PathLike | None = None, weights: str | None = None) -> dict:
    """What an export depends on (see the module doc); ``weights``: a precomputed ``weights_sha256``."""
    return {
        "engine": engine, "engine_version": engine_version, "torch_version": torch.__version__, "opset": int(opset),
        "input_shape": [int(v) for v in input_shape], "weights_sha256": weights or weights_sha256(network),
        "structure_sha256": structure_sha256(network),
        "checkpoint": None if checkpoint is None else Path(checkpoint).name,
        "checkpoint_sha256": None if checkpoint is None else file_sha256(checkpoint),
    }


def read_meta(entry: Path) -> dict | None:
    """An entry's ``engine.json`` (None when missing or unreadable: not a complete entry)."""
    try:
        meta = json.loads((Path(entry) / META_NAME).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _temporary(cache_dir: Path, key: str, suffix: str) -> Path:
    return temporary_dir(cache_dir, key, suffix)


def cached_build(cache_dir: str | os.PathLike, key: str, meta: dict, build: Callable[[Path], dict | None]) -> Path:
    """``cache_dir/key``: the existing complete entry, else one built by ``build(folder)`` in a
    temporary folder and published by a rename (first writer wins). ``build`` may return extra
    fields for ``engine.json``. Returns the entry's folder."""
    cache_dir = Path(cache_dir)
    target = cache_dir / key
    if read_meta(target) is not None:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(cache_dir)
    tmp = _temporary(cache_dir, key, ".building")
    try:
        extra = build(tmp) or {}
        data = json.dumps({**meta, **extra, "key": key}, indent=1, sort_keys=True, default=str)
        (tmp / META_NAME).write_text(data + "\n")
        os.chmod(tmp, cache_dir.stat().st_mode & 0o777)  # mkdtemp makes it private; readable like its parent
        _publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _publish(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` onto ``target`` unless a complete ``target`` exists (then drop ``tmp``);
    an incomplete ``target`` (no readable engine.json) is discarded first."""
    for _ in range(2):
        try:
            os.rename(tmp, target)  # fails when another process published ``target`` first
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            if read_meta(target) is not None:
                log.info("%s: another process exported it first; using that one", target)
                shutil.rmtree(tmp, ignore_errors=True)
                return
            log.warning("%s: incomplete engine export (no readable %s); replacing it", target, META_NAME)
            discard(target)
    raise OSError(errno.EEXIST, "could not publish the engine export", str(target))


def discard(entry: str | os.PathLike) -> None:
    """Remove an entry (e.g. one that no longer loads): first renamed out of the way, so that
    readers see it whole or not at all; a missing entry is no error."""
    entry = Path(entry)
    if not entry.exists():
        return
    aside = _temporary(entry.parent, entry.name, ".old")
    with contextlib.suppress(FileNotFoundError):
        os.replace(entry, aside / entry.name)
    shutil.rmtree(aside, ignore_errors=True)


def prune_stale(cache_dir: str | os.PathLike, meta: dict) -> int:
    """Remove the entries of ``meta``'s checkpoint (same file name) built from other weights;
    returns how many. Entries of other checkpoints and of the same weights stay."""
    cache_dir, removed = Path(cache_dir), 0
    if meta.get("checkpoint") is None or not cache_dir.is_dir():
        return 0
    for entry in cache_dir.iterdir():
        other = read_meta(entry) if entry.is_dir() and not entry.name.startswith(".") else None
        if other and other.get("checkpoint") == meta["checkpoint"] and (
                other.get("checkpoint_sha256") != meta.get("checkpoint_sha256") or other.get("weights_sha256") != meta.get("weights_sha256")):
            discard(entry)
            removed += 1
    if removed:
        log.info("%s: removed %d engine export(s) of an earlier %s", cache_dir, removed, meta["checkpoint"])
    return removed
