"""Fault injection for crash tests: kill the process at a named point of a long job.

Long jobs (training, preprocessing, prediction) call ``point(name)`` at the places where a
crash is worth proving harmless: every training iteration, between a checkpoint's temporary
file and its rename, before each validation case... Unless armed, ``point`` does nothing but
one comparison. Armed, the process dies with SIGKILL (no cleanup, no ``finally``, exactly as
``kill -9`` or a power cut) the N-th time it passes the named point::

    arm("train.iteration:17")                     # the 17th training iteration of this process
    arm("checkpoint.before_rename:3")             # the 3rd checkpoint write, before its rename
    arm("train.iteration:5,train.validation_case:1")  # whichever comes first

Counts start at 1 and are per process (a resumed run counts again from its own start). Tests
that want an in-process stop instead of a kill arm with ``action=raise_fault``: the point then
raises ``FaultInjected`` (a BaseException, so ``except Exception`` handlers do not swallow it,
as they could not swallow a kill).

Nothing here reads the environment: the command-line entry point calls
``arm_from_environment(os.environ)``, which arms from ``AUTOLIVER_FAULT_KILL_AT`` when it is
set (tests set it for child processes) and leaves everything inert otherwise.

Points in use: ``train.iteration`` (before each training step), ``train.log_appended`` (an
epoch's log.jsonl line written, its checkpoints not yet), ``checkpoint.before_rename`` (a
checkpoint's temporary file complete and synced, not yet renamed onto its name),
``train.validation_case`` (before each end-of-fold validation case).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from autoliver.core.errors import UsageError

log = logging.getLogger(__name__)

ENV_VAR = "AUTOLIVER_FAULT_KILL_AT"

Action = Callable[[str, int], None]


class FaultInjected(BaseException):
    """Raised at an armed point by ``raise_fault`` (an in-process stand-in for a kill)."""


def kill_process(name: str, count: int) -> None:
    """The default action: SIGKILL this process (nothing after this line runs)."""
    log.warning("fault injection: killing process %d at %s #%d", os.getpid(), name, count)
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def raise_fault(name: str, count: int) -> None:
    raise FaultInjected(f"fault injected at {name} #{count}")


@dataclass
class _Armed:
    targets: dict[str, int]
    action: Action
    hits: dict[str, int] = field(default_factory=dict)


_armed: _Armed | None = None  # set only by arm(); None: every point is inert


def parse(spec: str) -> dict[str, int]:
    """``"name:N[,name:N...]"`` -> {name: N}; a malformed spec is a UsageError naming it."""
    targets: dict[str, int] = {}
    for part in (p.strip() for p in spec.split(",")):
        name, sep, count = part.rpartition(":")
        if not part or not sep or not name or not count.isdigit() or int(count) < 1:
            raise UsageError(f"{ENV_VAR}={spec!r}: expected POINT:N[,POINT:N...] with N >= 1 (e.g. train.iteration:17)")
        targets[name] = int(count)
    return targets


def arm(spec: str, action: Action = kill_process) -> None:
    """Arm the points of ``spec`` (replaces any earlier arming)."""
    global _armed
    _armed = _Armed(parse(spec), action)
    log.warning("fault injection armed: %s", spec)


def disarm() -> None:
    global _armed
    _armed = None


@contextlib.contextmanager
def armed(spec: str, action: Action = raise_fault) -> Iterator[None]:
    """Armed inside the block (in-process tests: raises by default), inert after it."""
    arm(spec, action)
    try:
        yield
    finally:
        disarm()


def arm_from_environment(env: Mapping[str, str]) -> bool:
    """Arm from ``env[ENV_VAR]`` when it is set and not empty; returns whether it was."""
    spec = env.get(ENV_VAR, "").strip()
    if not spec:
        return False
    arm(spec)
    return True


def hits(name: str) -> int:
    """Times ``name`` was passed since arming (0 when not armed)."""
    return 0 if _armed is None else _armed.hits.get(name, 0)


def point(name: str) -> None:
    """A place where the process may be killed (when armed for ``name``)."""
    state = _armed
    if state is None or name not in state.targets:
        return
    count = state.hits.get(name, 0) + 1
    state.hits[name] = count
    if count == state.targets[name]:
        state.action(name, count)
