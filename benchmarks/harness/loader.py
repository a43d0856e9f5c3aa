"""The one loader-throughput rule: a fixed warm-up count, then timed batches.

The warm-up takes the first batch (worker start-up, first case reads) and then every batch the
loader's workers may already hold ready, so that the timed batches are the ones produced at
the loader's steady rate, not ones prefetched while nothing was timed: for autoliver's loader
(2 batches prefetched per worker, one in hand per worker, 2 spare) ``1 + 3 * workers + 2``;
nnU-Net's side (``nnunet_side``) drains its own queues (twice ``num_cached``, one per worker,
2) the same way. Standard library only: the nnU-Net side imports it under nnU-Net's Python.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def autoliver_warmup(workers: int) -> int:
    return 1 + (3 * workers + 2 if workers else 0)


def throughput(next_batch: Callable[[], object], batch_size: int, warmup: int, batches: int) -> dict:
    """Pull ``warmup`` batches untimed, then ``batches`` timed ones: samples/s and the seconds of every pull."""
    pulls = []
    for _ in range(warmup + batches):
        t0 = time.perf_counter()
        next_batch()
        pulls.append(time.perf_counter() - t0)
    seconds = sum(pulls[warmup:])
    return {"loader_warmup": warmup, "loader_batches": batches, "loader_s": seconds, "loader_pull_s": pulls,
            "loader_samples_per_s": batches * batch_size / seconds if seconds else None}


def autoliver_loader(folder, case_ids, cfg, workers: int, batches: int, seed: int = 0) -> dict:
    """autoliver's training loader alone (augmentation on), by the rule above."""
    from autoliver.data.loader import make_train_loader

    with make_train_loader(folder, list(case_ids), cfg, seed=seed, n_workers=workers) as loader:
        out = throughput(lambda: next(loader), cfg.batch_size, autoliver_warmup(workers), batches)
        out["tumour_share"] = loader.stats().tumour_share
    return {**out, "loader_workers": workers, "loader_cases": len(case_ids)}
