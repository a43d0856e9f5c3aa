"""Crash tests: run an autoliver call (the CLI or any function) in a child process, SIGKILL it
at a seeded point, run it again, and compare what it left with what an uninterrupted run
leaves.

The children are forked from a fork server (multiprocessing's "forkserver" start method)
that imported torch and autoliver once, so a child starts in milliseconds rather than the
seconds a fresh interpreter takes, and never inherits the test process's torch threads or
state. In the child, ``autoliver.core.faults`` is armed exactly as the CLI arms it from
``AUTOLIVER_FAULT_KILL_AT``: the child kills itself with SIGKILL the N-th time it passes the
named point (``kill_at="train.iteration:17"``), anywhere in autoliver, loader workers and all.

    run = run_cli(["train", "-d", DATASET, "2d", "0", ...], log_path=tmp / "run1.log", kill_at="train.iteration:17")
    assert run.killed
    run = run_cli([... "--continue"], log_path=tmp / "run2.log")
    assert run.exitcode == 0

``kill_points`` draws the points from a seeded generator; ``tensor_differences`` and
``stale_temporaries`` are the usual checks afterwards.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

HANG_GUARD_S = 900.0  # a child still running after this is a hang, not a slow run
PRELOAD = ["torch", "numpy", "autoliver.cli", "autoliver.api", "autoliver.train.trainer", "autoliver.data.loader",
           "autoliver.infer.predictor", "matplotlib.figure", "matplotlib.backends.backend_agg", "torch.optim", "torch._dynamo"]


@dataclass(frozen=True)
class ChildRun:
    """How a child ended: ``exitcode`` (negative: killed by that signal), its wall seconds and
    the file its stdout/stderr went to."""

    exitcode: int
    seconds: float
    log_path: Path | None

    @property
    def killed(self) -> bool:
        return self.exitcode == -signal.SIGKILL

    def tail(self, n: int = 4000) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        return self.log_path.read_text(errors="replace")[-n:]


_context: Any = None


def _fork_context():
    """The forkserver context, its server preloading torch and autoliver (started once)."""
    global _context
    if _context is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        _context = ctx
    return _context


def _resolve(target: str) -> Callable:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _child(target: str, args: tuple, kwargs: dict, kill_at: str | None, log_path: str | None, threads: int | None) -> None:
    """Runs in the child: redirect output, arm the fault point as the CLI would, call."""
    if log_path is not None:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    multiprocessing.set_start_method(None, force=True)  # the platform's default, as in a fresh `autoliver` process
    if threads is not None:
        torch.set_num_threads(threads)
    from autoliver.core import faults

    faults.arm_from_environment({faults.ENV_VAR: kill_at or ""})
    result = _resolve(target)(*args, **kwargs)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(result if isinstance(result, int) else 0)


def run_child(target: str, args: Sequence = (), kwargs: dict | None = None, *, kill_at: str | None = None,
              log_path: Path | None = None, threads: int | None = 1, hang_guard_s: float = HANG_GUARD_S) -> ChildRun:
    """Call ``target`` ("module:function") in a forked child; with ``kill_at`` ("POINT:N") the
    child is SIGKILLed the N-th time it passes POINT. An int returned is the exit code."""
    ctx = _fork_context()
    proc = ctx.Process(target=_child, args=(target, tuple(args), dict(kwargs or {}), kill_at,
                                            None if log_path is None else str(log_path), threads))
    t0 = time.monotonic()
    proc.start()
    proc.join(hang_guard_s)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        raise TimeoutError(f"{target} still running after {hang_guard_s:.0f} s (a hang)")
    return ChildRun(int(proc.exitcode), time.monotonic() - t0, log_path)


def run_cli(argv: Sequence[str], **kw) -> ChildRun:
    """``autoliver ARGV`` (autoliver.cli.main) in a forked child; see ``run_child``."""
    return run_child("autoliver.cli:main", (list(argv),), **kw)


def kill_points(seed: int, n: int, first: int, last: int) -> list[int]:
    """``n`` distinct indices in [first, last], increasing, drawn by a generator seeded ``seed``."""
    if last - first + 1 < n:
        raise ValueError(f"{n} kill points do not fit in [{first}, {last}]")
    rng = np.random.default_rng(seed)
    return sorted(int(v) for v in rng.choice(np.arange(first, last + 1), size=n, replace=False))


def stale_temporaries(folder: Path) -> list[Path]:
    """Hidden temporary files (``.*.tmp*``) under ``folder``: a write killed before its rename."""
    return sorted(p for p in Path(folder).rglob(".*") if ".tmp" in p.name)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes (so that NaN == NaN and -0.0 != 0.0: bit-identical means identical bits)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() and t.dtype != torch.bool else t


def tensor_differences(a: Any, b: Any, prefix: str = "") -> tuple[list[str], int]:
    """Paths where two nested dicts/lists of tensors and plain values differ (tensors bit for
    bit: dtype, shape and every element; NaN equals NaN), and the number of tensors compared."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape \
            and torch.equal(_bits(a), _bits(b))
        return ([] if same else [prefix or "<root>"]), 1
    if isinstance(a, dict) and isinstance(b, dict):
        diffs, n = ([] if a.keys() == b.keys() else [f"{prefix}: keys {sorted(set(a) ^ set(b), key=str)}"]), 0
        for k in a.keys() & b.keys():
            d, m = tensor_differences(a[k], b[k], f"{prefix}.{k}" if prefix else str(k))
            diffs, n = diffs + d, n + m
        return diffs, n
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{prefix}: length {len(a)} vs {len(b)}"], 0
        diffs, n = [], 0
        for i, (x, y) in enumerate(zip(a, b)):
            d, m = tensor_differences(x, y, f"{prefix}[{i}]")
            diffs, n = diffs + d, n + m
        return diffs, n
    same = a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)
    return ([] if same else [prefix or "<root>"]), 0


# output files whose content records wall-clock times: compared without those fields
TIMED_KEYS = {"seconds", "case_seconds", "time_s", "timings", "stage_seconds", "peak_rss_mb", "created", "elapsed_s", "events"}


def _without_times(value):
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if k not in TIMED_KEYS and not k.endswith("_s")}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def contents(folder: Path) -> dict[str, object]:
    """Every file under ``folder``: JSON parsed (times dropped), anything else as bytes."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            rel = str(p.relative_to(folder))
            out[rel] = _without_times(json.loads(p.read_text())) if p.suffix == ".json" else p.read_bytes()
    return out


def differing(a: dict, b: dict) -> list[str]:
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
