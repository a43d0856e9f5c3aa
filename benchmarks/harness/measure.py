"""The one way benchmarks measure a setting: a fresh child process (``benchmarks.child``).

``run_child`` starts ``python -m benchmarks.child MODULE:FUNCTION`` (this Python, or another
one such as nnU-Net's), waits for it and returns what it reported at its end:

- ``peak_rss``: the child's own peak resident memory (VmHWM; ru_maxrss without /proc), a
  per-setting peak, never an earlier setting's; ``peak_rss_before_call``: the same after the
  interpreter and the imports, before the measured call; ``children_peak_rss``: the largest
  worker process it waited for;
- ``value``: the function's return value; ``wall_s``, ``cpu_s``, ``returncode``.

Tools that work in worker processes (both tools' preprocessing, training loaders, nnU-Net's
export) are also watched from outside while they run (``poll_s``): the largest sum of RSS and
of PSS over the child and all its descendants at one poll (``peak_tree_rss``, ``peak_tree_pss``:
PSS splits shared pages between their users, the closer estimate of the RAM the tree
occupies; None where unreadable), the largest single RSS and the process count. A spike
shorter than ``poll_s`` can be missed there, never in ``peak_rss``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20


def child_env(env: dict | None = None, threads: int | None = None) -> dict:
    """``env`` (default: this environment) with the repository importable and the thread count set."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _tree_memory(root: psutil.Process, with_pss: bool) -> tuple[list[int], list[int | None], dict]:
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return [], [], {}
    rss, pss, cpu = [], [], {}
    for p in procs:
        try:
            if with_pss:
                full = p.memory_full_info()
                rss.append(int(full.rss))
                pss.append(int(full.pss) if hasattr(full, "pss") else None)
            else:
                rss.append(int(p.memory_info().rss))
            t = p.cpu_times()
            cpu[(p.pid, p.create_time())] = t.user + t.system
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        except psutil.AccessDenied:
            pss.append(None)
    return rss, pss, cpu


def run_child(target: str, *, kwargs: dict | None = None, argv: list[str] | None = None, python: str | os.PathLike | None = None,
              env: dict | None = None, threads: int | None = None, log_path: str | os.PathLike | None = None,
              poll_s: float | None = 0.2, with_pss: bool = True, timeout_s: float | None = None) -> dict:
    """Run ``target`` (``module:function``) in a fresh process and measure it (see the module doc).

    A failure is returned (``ok`` False, ``error``), not raised: the caller decides.
    """
    with tempfile.TemporaryDirectory(prefix="bench_child_") as tmp:
        spec, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps({"argv": [str(a) for a in argv]} if argv is not None else {"kwargs": kwargs or {}}, default=str))
        cmd = [str(python or sys.executable), "-m", "benchmarks.child", target, str(spec), str(result)]
        out = open(log_path, "wb") if log_path else subprocess.DEVNULL
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        peak_rss = peak_single = max_procs = 0
        peak_pss: int | None = 0 if with_pss else None
        cpu_seen: dict = {}
        start = time.perf_counter()
        try:
            popen = subprocess.Popen(cmd, env=child_env(env, threads), stdout=out, stderr=subprocess.STDOUT)
            root = psutil.Process(popen.pid)
            while popen.poll() is None:
                if poll_s:
                    rss, pss, cpu = _tree_memory(root, with_pss)
                    cpu_seen.update(cpu)
                    if rss:
                        peak_rss, peak_single = max(peak_rss, sum(rss)), max(peak_single, max(rss))
                        max_procs = max(max_procs, len(rss))
                    if peak_pss is not None and pss:
                        peak_pss = None if None in pss else max(peak_pss, sum(pss))
                if timeout_s is not None and time.perf_counter() - start > timeout_s:
                    for p in reversed([root, *root.children(recursive=True)]):
                        try:
                            p.kill()
                        except psutil.NoSuchProcess:
                            pass
                    popen.wait()
                    break
                time.sleep(poll_s or 0.05)
            wall = time.perf_counter() - start
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        reported = json.loads(result.read_text()) if result.is_file() else {}
    timed_out = timeout_s is not None and wall > timeout_s and not reported
    r = {
        "target": target, "returncode": popen.returncode, "ok": popen.returncode == 0 and bool(reported.get("ok")),
        "error": reported.get("error") or (f"timed out after {timeout_s:.0f} s" if timed_out else None if reported else
                                           f"no result (exit status {popen.returncode})"),
        "wall_s": wall, "cpu_s": max(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, sum(cpu_seen.values())),
        "peak_rss": reported.get("peak_rss"), "peak_rss_source": reported.get("peak_rss_source"),
        "peak_rss_before_call": reported.get("peak_rss_before_call"), "children_peak_rss": reported.get("children_peak_rss"),
        "value": reported.get("value"), "log": str(log_path) if log_path else None,
    }
    if poll_s:
        r.update(peak_tree_rss=peak_rss, peak_tree_pss=peak_pss, peak_single_rss=peak_single, max_processes=max_procs,
                 cpu_share=r["cpu_s"] / wall if wall else None)
    return r


def mib(n: float | None) -> float | None:
    return None if n is None else n / MIB


PROCESS_METRICS = (("wall time (s)", "wall_s", 1), ("CPU time, process tree (s)", "cpu_s", 1),
                   ("peak RSS, main process (MiB)", "peak_rss", MIB), ("peak RSS, process tree sum (MiB)", "peak_tree_rss", MIB),
                   ("peak PSS, process tree sum (MiB)", "peak_tree_pss", MIB), ("peak RSS, largest single process (MiB)", "peak_single_rss", MIB))


def process_metrics(m: dict) -> dict[str, float | None]:
    """The time and memory figures of one ``run_child`` result, by label (seconds, MiB)."""
    return {label: None if m.get(k) is None else m[k] / scale for label, k, scale in PROCESS_METRICS if k in m}


def disk_usage(path: str | os.PathLike) -> int:
    """Sum of the sizes of the regular files under ``path`` (bytes; symlinks not followed)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(os.stat(os.path.join(d, f)).st_size for d, _, files in os.walk(path) for f in files
               if not os.path.islink(os.path.join(d, f)))
