"""One parallel map for every per-case stage: joblib (loky) workers and a tqdm bar.

Cases run one per worker, so memory stays bounded by ``n_jobs`` cases. With ``n_jobs == 1``
the work runs in this process (no worker start-up, plain tracebacks).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from joblib import Parallel, delayed
from tqdm import tqdm

# loky replaces a worker whose memory grew a lot; that is expected after a large case and
# says nothing to the user
_LOKY_WORKER_STOPPED = "A worker stopped while some jobs were given to the executor"


def parallel_map(
    fn: Callable[..., Any],
    args: Sequence[tuple],
    n_jobs: int = 1,
    progress: bool = True,
    desc: str = "",
    ordered: bool = True,
) -> Iterator[Any]:
    """Yield ``fn(*a)`` for each tuple in ``args``; in input order unless ``ordered=False``."""
    if n_jobs < 1:
        raise ValueError(f"n_jobs must be >= 1, got {n_jobs}")
    n_jobs = min(n_jobs, max(1, len(args)))
    bar = tqdm(total=len(args), desc=desc, unit="case", disable=not progress)
    try:
        if n_jobs == 1:
            results = (fn(*a) for a in args)
        else:
            mode = "generator" if ordered else "generator_unordered"
            results = Parallel(n_jobs=n_jobs, backend="loky", return_as=mode)(delayed(fn)(*a) for a in args)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_LOKY_WORKER_STOPPED)
            for result in results:
                bar.update(1)
                yield result
    finally:
        bar.close()
