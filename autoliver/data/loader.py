"""Training and validation loaders: endless batches of patches, made in worker processes.

``make_train_loader(...)`` returns a ``PatchLoader``: iterate it for batches
``dict(data=float32 (B, C, *patch), target=int64 (B, 1, *patch), tumour=bool (B,),
forced=int8 (B,))`` (torch tensors), call ``close()`` or use it as a context manager.
``roi=LiverRoi(margin_mm)`` (a two-stage design's tumour stage) cuts every patch around the
case's liver box plus a randomly jittered margin (``autoliver.data.sampler``).

Batch ``i`` of a loader is made from its own generator, seeded by (seed, i), so the sequence
depends on the seed alone: not on the number of workers, nor on what came before. Workers
are a torch DataLoader over an IterableDataset: with ``n`` workers, worker ``w`` makes the
batches ``w, w + n, w + 2n, ...`` and they come back in that order. ``start=k`` makes a loader
whose first batch is batch ``k`` of the sequence (what a fresh loader yields after ``k``
batches): a resumed training run restarts its data streams exactly where they stopped
(``PatchLoader.position`` counts the batches delivered, from ``start``). The DataLoader draws
its workers' base seed from a generator of its own, never from torch's global one, so making
a loader leaves the caller's random streams untouched. Shutdown, in every case:

- normal end / ``close()`` / leaving the ``with`` block: the workers are stopped and joined
  (torch terminates any that do not stop within its 5 s status interval);
- an exception or Ctrl-C (KeyboardInterrupt) in the main process: the ``with`` block (or the
  loader's finaliser at interpreter exit) closes it; workers ignore the terminal's SIGINT
  (torch) and stop when told;
- an exception in a worker: the worker sends it back and stops; the main process closes
  the loader and raises ``DataLoadingError`` naming the case (no hang);
- the main process killed (SIGKILL/SIGTERM): on Linux each worker (always forked from the
  main process, ``WORKER_START``) asked the kernel for a SIGKILL when its parent dies
  (``PR_SET_PDEATHSIG``); elsewhere torch's watchdog notices the orphaning within 5 s.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import sys
import threading
import traceback
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from autoliver.core.errors import DataLoadingError, MissingArtefactError
from autoliver.data.augment import default_settings
from autoliver.data.batches import PREV_SUFFIX, BatchMaker, BatchSpec, SampleError
from autoliver.data.sampler import FOREGROUND, TUMOUR, LiverRoi
from autoliver.preprocess.runner import folder_pad_value
from autoliver.preprocess.storage import case_done
from planning.plans import Configuration

log = logging.getLogger(__name__)

DEFAULT_TUMOUR_SHARE = 0.5
PR_SET_PDEATHSIG = 1
# Linux: workers are forked children of the process that iterates (whatever the global start
# method, which is "forkserver" by default from Python 3.14 and in processes a forkserver
# started), so that they can ask to die with it; elsewhere the platform's default
WORKER_START = "fork" if sys.platform.startswith("linux") else None


@dataclass(frozen=True)
class LoaderStats:
    """What the loader has delivered so far (counted in the main process)."""

    batches: int
    patches: int
    tumour_patches: int  # patches whose target holds tumour (after augmentation)
    forced_foreground: int  # patches centred on a liver voxel
    forced_tumour: int  # patches centred on a voxel of a uniformly drawn tumour component

    @property
    def tumour_share(self) -> float:
        return self.tumour_patches / self.patches if self.patches else 0.0


def _to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def batch_rng(seed: int, index: int) -> np.random.Generator:
    """The generator batch ``index`` of a loader seeded ``seed`` is made from."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


class _BatchStream(IterableDataset):
    """Endless batches from ``start`` on; worker ``w`` of ``n`` makes batches w, w + n, ...;
    in a worker, an error is sent back as a batch with an "error" key."""

    def __init__(self, spec: BatchSpec, seed: int, start: int = 0):
        super().__init__()
        self.spec, self.seed, self.start = spec, seed, start

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, step = (0, 1) if info is None else (info.id, info.num_workers)
        maker = BatchMaker(self.spec)
        index = self.start + worker
        while True:
            rng = batch_rng(self.seed, index)
            index += step
            if info is None:
                yield _to_torch(maker.batch(rng))
                continue
            try:
                batch = maker.batch(rng)
            except Exception as exc:  # sent to the main process, which raises it
                yield {"error": str(exc), "traceback": traceback.format_exc()}
                return
            yield _to_torch(batch)


def _worker_init(parent_pid: int, use_pdeathsig: bool, worker_id: int) -> None:
    """Die with the parent (Linux), and never react to the terminal's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C and stops us
    if use_pdeathsig and sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no glibc
            pass
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)


def _shutdown(iterator) -> None:
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


class PatchLoader:
    """Endless batches of patches from batch ``start`` of the seed's sequence on; ``close()``
    (or ``with``) stops the workers."""

    def __init__(self, spec: BatchSpec, seed: int, n_workers: int = 0, prefetch: int = 2, pin_memory: bool = False, start: int = 0):
        if n_workers < 0:
            raise ValueError(f"n_workers must be >= 0, got {n_workers}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.spec, self.seed, self.n_workers, self.start = spec, int(seed), int(n_workers), int(start)
        self._counts = np.zeros(5, dtype=np.int64)  # batches, patches, tumour, forced fg, forced tumour
        self._closed = False
        stream = _BatchStream(spec, self.seed, self.start)
        if n_workers == 0:
            self._iter = iter(stream)
            self._finalizer = None
            return
        init = functools.partial(_worker_init, os.getpid(), threading.current_thread() is threading.main_thread())
        loader = DataLoader(stream, batch_size=None, num_workers=n_workers, prefetch_factor=prefetch,
                            persistent_workers=False, pin_memory=pin_memory, worker_init_fn=init,
                            multiprocessing_context=WORKER_START,
                            generator=torch.Generator().manual_seed(self.seed))  # not torch's global generator
        self._iter = iter(loader)  # starts the workers
        self._finalizer = weakref.finalize(self, _shutdown, self._iter)

    def __iter__(self) -> "PatchLoader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._closed:
            raise DataLoadingError("the loader is closed; make a new one with make_train_loader")
        try:
            batch = next(self._iter)
        except SampleError as exc:  # in-process (n_workers=0)
            self.close()
            raise DataLoadingError(str(exc)) from exc
        except BaseException:
            self.close()
            raise
        if "error" in batch:
            log.debug("worker traceback:\n%s", batch["traceback"])
            self.close()
            raise DataLoadingError(f"loader worker failed: {batch['error']}")
        kinds = batch["forced"]
        self._counts += (1, len(kinds), int(batch["tumour"].sum()), int((kinds == FOREGROUND).sum()),
                         int((kinds == TUMOUR).sum()))
        return batch

    def stats(self) -> LoaderStats:
        return LoaderStats(*(int(v) for v in self._counts))

    @property
    def position(self) -> int:
        """Index of the next batch in the seed's sequence: ``start`` + batches delivered."""
        return self.start + int(self._counts[0])

    def worker_pids(self) -> list[int]:
        return [w.pid for w in getattr(self._iter, "_workers", [])]

    def close(self) -> None:
        """Stop and join the workers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._finalizer is not None:
            self._finalizer()  # runs _shutdown once
        self._iter = iter(())

    def __enter__(self) -> "PatchLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def default_pad_value(folder: Path) -> float:
    """What patches beyond the volume are padded with: the folder's normalised air (recorded by
    preprocessing; see ``autoliver.preprocess.runner.folder_pad_value``), so they look like the
    air around the body rather than like liver."""
    return folder_pad_value(folder)


def _spec(folder: Path, case_ids: Sequence[str], config: Configuration, augment: bool, oversample_foreground: float,
          tumour_share: float | None, prev_stage_folder: Path | None, n_classes: int, pad_value: float | None,
          batch_size: int | None, elastic: bool, roi: LiverRoi | None = None) -> BatchSpec:
    folder = Path(folder)
    if config.network_dims not in (2, 3) or len(config.patch_size) != config.network_dims:
        raise ValueError(f"configuration {config.name}: network_dims {config.network_dims} with patch {config.patch_size}")
    if not case_ids:
        raise ValueError("case_ids is empty: a loader needs at least one case")
    if not 0.0 <= oversample_foreground <= 1.0:
        raise ValueError(f"oversample_foreground must lie in [0, 1], got {oversample_foreground}")
    share = DEFAULT_TUMOUR_SHARE if tumour_share is None else float(tumour_share)
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"tumour_share must lie in [0, 1], got {tumour_share}")
    if config.in_slices < 1 or config.in_slices % 2 == 0:
        raise ValueError(f"configuration {config.name}: in_slices must be odd and >= 1, got {config.in_slices}")
    missing = [c for c in case_ids if not case_done(folder, c)]
    if missing:
        raise MissingArtefactError(f"{folder}: preprocessed case(s) {', '.join(missing[:5])} missing; run `autoliver plan_and_preprocess` (it resumes)")
    if prev_stage_folder is not None:
        absent = [c for c in case_ids if not (Path(prev_stage_folder) / f"{c}{PREV_SUFFIX}").is_file()]
        if absent:
            raise MissingArtefactError(f"{prev_stage_folder}: previous-stage predictions for {', '.join(absent[:5])} missing; "
                                       f"predict the {config.previous_stage or 'previous'} stage for these cases first")
    if roi is not None and not isinstance(roi, LiverRoi):
        raise TypeError(f"roi must be a LiverRoi or None, got {type(roi).__name__}")
    b = int(batch_size or config.batch_size)
    if b < 1:
        raise ValueError(f"batch_size must be >= 1, got {b}")
    return BatchSpec(
        folder=folder, case_ids=tuple(case_ids), network_dims=config.network_dims,
        patch_size=tuple(int(p) for p in config.patch_size), batch_size=b, in_slices=int(config.in_slices),
        oversample_foreground=float(oversample_foreground), tumour_share=share,
        settings=default_settings(config.patch_size, elastic=elastic) if augment else None,
        prev_stage_folder=None if prev_stage_folder is None else Path(prev_stage_folder), n_classes=int(n_classes),
        pad_value=default_pad_value(folder) if pad_value is None else float(pad_value),
        roi=roi, spacing=None if roi is None else tuple(float(v) for v in config.spacing),
    )


def make_train_loader(folder: Path, case_ids: list[str], config: Configuration, *, seed: int, n_workers: int,
                      augment: bool = True, oversample_foreground: float = 0.33, tumour_share: float | None = None,
                      prev_stage_folder: Path | None = None, n_classes: int = 3, pad_value: float | None = None,
                      batch_size: int | None = None, elastic: bool = False, pin_memory: bool = False,
                      roi: LiverRoi | None = None, start: int = 0) -> PatchLoader:
    """Endless augmented batches of ``config``'s patches from the cases ``case_ids`` in ``folder``.

    ``tumour_share``: share of the forced-foreground samples of a case with tumour that are
    centred on a uniformly drawn tumour component (None: 0.5). ``batch_size`` overrides the
    plan's (e.g. per-rank batch in distributed training; give each rank its own seed).
    ``roi``: sample inside each case's jittered liver box (a tumour stage: ``LiverRoi(config.roi_margin_mm)``);
    None (default) samples the whole volume, exactly as without the argument.
    ``start``: the index of the first batch (a resumed run passes the batches already used).
    """
    spec = _spec(folder, case_ids, config, augment, oversample_foreground, tumour_share, prev_stage_folder,
                 n_classes, pad_value, batch_size, elastic, roi)
    return PatchLoader(spec, seed, n_workers, pin_memory=pin_memory, start=start)


def make_val_loader(folder: Path, case_ids: list[str], config: Configuration, *, seed: int = 0, n_workers: int = 0,
                    oversample_foreground: float = 0.33, tumour_share: float | None = None,
                    prev_stage_folder: Path | None = None, n_classes: int = 3, pad_value: float | None = None,
                    batch_size: int | None = None, pin_memory: bool = False, roi: LiverRoi | None = None,
                    start: int = 0) -> PatchLoader:
    """Like ``make_train_loader`` without augmentation; a new loader with the same seed (and
    ``start``) yields the same batches (e.g. one per epoch for the pseudo-Dice)."""
    spec = _spec(folder, case_ids, config, False, oversample_foreground, tumour_share, prev_stage_folder,
                 n_classes, pad_value, batch_size, False, roi)
    return PatchLoader(spec, seed, n_workers, pin_memory=pin_memory, start=start)

