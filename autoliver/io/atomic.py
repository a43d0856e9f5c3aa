"""Atomic writes: write under a temporary name in the target folder, then rename.

A crash at any point leaves either the old file or the new one, never half of one.

Temporary names are hidden and carry their writer, ``.<name>.<host>-<pid>.<random>.tmp<suffix>``
(folders: ``.building`` / ``.old``), so that a later run can tell the leftovers of a killed
process (same host, process gone) from the files a live writer is still working on, and remove
them: ``remove_stale_temporaries(folder)``, called by every stage on the folders it writes.

An ``OSError`` raised while writing (disk full, quota, read-only file system, permission
denied) is raised again naming the file that was being written when the error itself names
none, so the message says where.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from autoliver.core import faults
from planning.hashing import json_default

log = logging.getLogger(__name__)

_STALE_RE = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[0-9a-z_]{8,16}\.(?:tmp.*|building|old)$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"


def _owner() -> str:
    """``<host>-<pid>`` of this process (the pid is read at every call: forked workers differ)."""
    return f"{_host()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """The temporary files and folders in ``folder`` left by a process of this host that no
    longer runs (killed mid-write)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    host, stale = _host(), []
    for entry in folder.iterdir():
        m = _STALE_RE.match(entry.name)
        if m and m["host"] == host and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
            stale.append(entry)
    return sorted(stale)


def remove_stale_temporaries(*folders: str | os.PathLike) -> int:
    """Remove what ``stale_temporaries`` finds in each folder; returns how many were removed."""
    removed = 0
    for folder in folders:
        for entry in stale_temporaries(folder):
            with contextlib.suppress(FileNotFoundError):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed += 1
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run", removed)
    return removed


def temporary_dir(folder: str | os.PathLike, name: str, suffix: str = ".tmp") -> Path:
    """A new hidden folder in ``folder`` named for ``name`` and its writer, which
    ``remove_stale_temporaries`` removes once the writer is gone."""
    return Path(tempfile.mkdtemp(prefix=f".{name}.{_owner()}.", suffix=suffix, dir=folder))


def check_writable(folder: str | os.PathLike) -> Path:
    """Make ``folder`` (with its parents) and prove a file can be written in it, before any long
    work whose results would go there: an ``OSError`` naming the folder otherwise."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-check.{_owner()}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with naming(folder):
            with open(probe, "wb") as f:
                f.write(b"0")
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return folder


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise an ``OSError`` that names no file (ENOSPC from a write, ...) naming ``path``."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:  # named already, or autoliver's own message
            raise
        raise type(exc)(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` on success.

    ``suffix`` is kept at the end of the temporary name so that writers that pick the
    format from the extension (SimpleITK, numpy) behave as for the real name.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = target.parent / f".{target.name}.{_owner()}.{uuid.uuid4().hex[:12]}.tmp{suffix}"
    # created here (not by mkstemp, which makes 0600 files) so the umask gives the usual mode
    os.close(os.open(tmp_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        with naming(target):
            yield tmp_path
            faults.point("atomic.before_rename")
            os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a new temporary folder next to ``target``; on success put it in ``target``'s
    place (an existing ``target`` is replaced), else remove it: an interrupted build leaves
    either the old folder or the new one, never half of one."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_dir(target.parent, target.name, ".building")
    try:
        yield tmp
        faults.point("atomic.before_rename")
        if target.exists():
            old = temporary_dir(target.parent, target.name, ".old")
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_json(target: str | os.PathLike, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n"
    write_bytes(target, text.encode("utf-8"))
