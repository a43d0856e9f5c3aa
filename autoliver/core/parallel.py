"""One parallel map for every per-case stage: joblib (loky) workers and a tqdm bar.

Cases run one per worker, so memory stays bounded by ``n_jobs`` cases. With ``n_jobs == 1``
the work runs in this process (no worker start-up, plain tracebacks).

Workers die with the process that started them: each watches its parent process and exits at
once when it is gone (killed with ``kill -9``), instead of finishing its case for nobody.
What it was writing is a hidden temporary file that the next run removes
(``autoliver.io.atomic.remove_stale_temporaries``).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from joblib import Parallel, delayed
from tqdm import tqdm

# loky replaces a worker whose memory grew a lot; that is expected after a large case and
# says nothing to the user
_LOKY_WORKER_STOPPED = "A worker stopped while some jobs were given to the executor"
_PARENT_POLL_S = 0.5
_watching: list[int] = []  # the parent pid this worker process watches (set once per process)


def _exit_when_orphaned(parent: int, poll_s: float) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(1)
        threading.Event().wait(poll_s)


def watch_parent(parent: int, poll_s: float = _PARENT_POLL_S) -> None:
    """In a worker: start (once) a daemon thread that ends this process when ``parent`` is no
    longer its parent process. Does nothing in the parent itself."""
    if parent == os.getpid() or _watching:
        return
    _watching.append(parent)
    threading.Thread(target=_exit_when_orphaned, args=(parent, poll_s), name="watch-parent", daemon=True).start()


def _guarded(parent: int, fn: Callable[..., Any], *a: Any) -> Any:
    watch_parent(parent)
    return fn(*a)


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
            me = os.getpid()
            results = Parallel(n_jobs=n_jobs, backend="loky", return_as=mode)(delayed(_guarded)(me, fn, *a) for a in args)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_LOKY_WORKER_STOPPED)
            for result in results:
                bar.update(1)
                yield result
    finally:
        bar.close()
