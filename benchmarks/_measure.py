"""Measuring a command as a process tree: wall time, peak memory, CPU time; disk usage of a folder.

Memory is polled (psutil, every ``poll_s`` seconds) over the command's process and all its
descendants, because tools like nnU-Net do the work in worker processes:

- ``peak_tree_rss``: the largest sum of RSS over the tree seen at one poll. Pages shared
  between processes (forked workers, shared libraries) are counted once per process, so this
  overstates the physical memory the tree needs;
- ``peak_tree_pss``: the same with PSS (proportional set size: shared pages split between
  their users), the closer estimate of the RAM the tree occupies; None where unavailable;
- ``peak_single_rss``: the largest RSS of any one process at any poll.

Polling can miss a spike shorter than ``poll_s``. CPU time (user + system) is the larger of
two estimates: getrusage of the descendants that were waited for (covers worker processes
their parents joined), and the sum over every process seen of its last polled CPU time (covers
workers never joined, misses at most ``poll_s`` of each process's final work).
"""

from __future__ import annotations

import logging
import os
import resource
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunMeasurement:
    command: tuple[str, ...]
    returncode: int
    wall_s: float
    cpu_s: float
    peak_tree_rss: int  # bytes
    peak_tree_pss: int | None  # bytes
    peak_single_rss: int  # bytes
    max_processes: int
    log_path: str | None

    def to_json(self) -> dict:
        return asdict(self)


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _memory(proc: psutil.Process, with_pss: bool) -> tuple[int, int | None]:
    """(rss, pss) of one process in bytes; (0, 0) if it is gone."""
    try:
        if with_pss:
            full = proc.memory_full_info()
            pss = getattr(full, "pss", None)
            return int(full.rss), None if pss is None else int(pss)
        return int(proc.memory_info().rss), None
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return 0, 0
    except psutil.AccessDenied:
        return 0, None


def _cpu_s(proc: psutil.Process) -> tuple[tuple[int, float], float] | None:
    """((pid, create time), user + system CPU seconds) of one process, or None if it is gone."""
    try:
        t = proc.cpu_times()
        return (proc.pid, proc.create_time()), t.user + t.system
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return None


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure_command(
    command: list[str],
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    log_path: str | os.PathLike | None = None,
    poll_s: float = 0.1,
    with_pss: bool = True,
    timeout_s: float | None = None,
) -> RunMeasurement:
    """Run ``command`` to completion and measure it; stdout and stderr go to ``log_path``.

    A non-zero exit status is returned, not raised: the caller decides. ``timeout_s`` kills
    the whole tree when exceeded (returncode -9).
    """
    if poll_s <= 0:
        raise ValueError(f"poll_s must be > 0, got {poll_s}")
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL
    cpu0 = _children_cpu_s()
    peak_rss = peak_single = max_procs = 0
    peak_pss: int | None = 0 if with_pss else None
    cpu_seen: dict[tuple[int, float], float] = {}  # (pid, create time) -> last CPU seconds
    start = time.perf_counter()
    try:
        popen = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        root = psutil.Process(popen.pid)
        while True:
            procs = _tree(root)
            mems = [_memory(p, with_pss) for p in procs]
            for seen in filter(None, map(_cpu_s, procs)):
                cpu_seen[seen[0]] = seen[1]
            rss = [m[0] for m in mems]
            if rss:
                peak_rss = max(peak_rss, sum(rss))
                peak_single = max(peak_single, max(rss))
                max_procs = max(max_procs, sum(1 for r in rss if r))
            if peak_pss is not None:
                pss = [m[1] for m in mems]
                if any(p is None for p in pss):
                    peak_pss = None  # not readable here: report nothing rather than a partial sum
                else:
                    peak_pss = max(peak_pss, sum(pss))
            if popen.poll() is not None:
                break
            if timeout_s is not None and time.perf_counter() - start > timeout_s:
                log.error("%s: over %.0f s, killing its process tree", command[0], timeout_s)
                for p in reversed(_tree(root)):
                    try:
                        p.kill()
                    except psutil.NoSuchProcess:
                        pass
                popen.wait()
                break
            time.sleep(poll_s)
        wall = time.perf_counter() - start
    finally:
        if out is not subprocess.DEVNULL:
            out.close()
    return RunMeasurement(
        command=tuple(str(c) for c in command),
        returncode=int(popen.returncode),
        wall_s=wall,
        cpu_s=max(_children_cpu_s() - cpu0, sum(cpu_seen.values())),
        peak_tree_rss=peak_rss,
        peak_tree_pss=peak_pss,
        peak_single_rss=peak_single,
        max_processes=max_procs,
        log_path=str(log_path) if log_path else None,
    )


def disk_usage(path: str | os.PathLike) -> int:
    """Sum of the sizes of all regular files under ``path`` (bytes; symlinks not followed)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                total += os.stat(p).st_size
    return total


def disk_usage_by_child(path: str | os.PathLike) -> dict[str, int]:
    """disk_usage of each direct child of ``path`` (files and folders), by name."""
    path = Path(path)
    if not path.is_dir():
        return {}
    return {child.name: disk_usage(child) for child in sorted(path.iterdir())}


def human_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024.0
    return f"{n:.2f} GiB"
