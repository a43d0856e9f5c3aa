"""One parallel map for every per-case stage: joblib (loky) workers and a tqdm bar.

Cases run one per worker, so memory stays bounded by ``n_jobs`` cases. With ``n_jobs == 1``
the work runs in this process (no worker start-up, plain tracebacks).

Workers die with the process that started them: each watches its parent process and exits at
once when it is gone (killed with ``kill -9``), instead of finishing its case for nobody.
What it was writing is a hidden temporary file that the next run removes
(``autoliver.io.atomic.remove_stale_temporaries``).

On a cluster: inside ``with cluster(ADDRESS):`` (the CLI's ``--scheduler ADDRESS``) every
per-case stage sends its cases to a Dask distributed scheduler instead (``tcp://host:8786``,
or ``local`` / ``local:N`` for a cluster of N worker processes on this machine). The workers
must see the same paths (a shared file system) and have autoliver installed. A case whose
worker dies is run again on another worker (``CLUSTER_RETRIES`` times); its writes are atomic,
so a half-done case leaves nothing but a temporary file. Results are the same as a local run:
per-case work depends only on the case.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from joblib import Parallel, delayed
from tqdm import tqdm

from autoliver.core.errors import UsageError

# loky replaces a worker whose memory grew a lot; that is expected after a large case and
# says nothing to the user
_LOKY_WORKER_STOPPED = "A worker stopped while some jobs were given to the executor"
_PARENT_POLL_S = 0.5
CLUSTER_RETRIES = 3
log = logging.getLogger(__name__)
_client: contextvars.ContextVar[Any] = contextvars.ContextVar("autoliver_dask_client", default=None)
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
    client = _client.get()
    try:
        if client is not None and args:
            results = _on_cluster(client, fn, args, ordered)
        elif n_jobs == 1:
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


def active_cluster() -> Any | None:
    """The Dask client of the enclosing ``cluster(...)`` block, None when work runs locally."""
    return _client.get()


def _on_cluster(client: Any, fn: Callable[..., Any], args: Sequence[tuple], ordered: bool) -> Iterator[Any]:
    from distributed import as_completed

    futures = [client.submit(fn, *a, pure=False, retries=CLUSTER_RETRIES) for a in args]
    try:
        if ordered:
            for future in futures:
                yield future.result()
        else:
            for future in as_completed(futures):
                yield future.result()
    finally:
        client.cancel([f for f in futures if not f.done()])


def _connect(address: str) -> tuple[Any, Any]:
    """(client, local cluster or None) for ``address``: ``local``, ``local:N`` or a scheduler's."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise UsageError("--scheduler needs Dask: pip install 'dask[distributed]' (or autoliver[cluster])") from None
    if address == "local" or address.startswith("local:"):
        n = address.partition(":")[2]
        if n and not n.isdigit() or n == "0":
            raise UsageError(f"--scheduler {address}: expected local or local:N with N >= 1 worker processes")
        local = LocalCluster(n_workers=int(n) if n else None, threads_per_worker=1, processes=True, dashboard_address=":0",
                             silence_logs=logging.WARNING)
        return Client(local), local
    try:
        return Client(address, timeout="30s"), None
    except (OSError, TimeoutError) as exc:
        raise UsageError(f"--scheduler {address}: cannot reach the Dask scheduler ({exc}); start it with `dask scheduler` "
                         "and workers with `dask worker ADDRESS` on machines that see the same files") from None


@contextlib.contextmanager
def cluster(address: str | None) -> Iterator[Any]:
    """Inside, ``parallel_map`` runs its cases on the Dask scheduler at ``address`` (None: locally)."""
    if not address:
        yield None
        return
    client, local = _connect(address)
    log.info("per-case work goes to the Dask scheduler %s (%d worker(s))", client.scheduler.address,
             len(client.scheduler_info().get("workers", {})))
    token = _client.set(client)
    try:
        yield client
    finally:
        _client.reset(token)
        client.close()
        if local is not None:
            local.close()
