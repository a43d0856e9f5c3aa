"""What a killed run leaves: its workers die with it, its hidden temporary files are removed by
the next run (and only those of processes that are gone), and a write that fails for lack of
space or permission names the file it was writing."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import wait_for

from autoliver.io import atomic
from autoliver.io.atomic import atomic_path, remove_stale_temporaries, stale_temporaries

CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from autoliver.core.parallel import parallel_map

    def work(folder):
        (Path(folder) / f"worker-{os.getpid()}").touch()
        time.sleep(600)  # a case that takes long: the parent is killed meanwhile

    list(parallel_map(work, [(sys.argv[1],)] * 2, n_jobs=2, progress=False))
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.subprocess
def test_workers_exit_when_their_parent_is_killed(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], start_new_session=True)
    try:
        wait_for(lambda: len(list(tmp_path.glob("worker-*"))) == 2)
        workers = [int(p.name.split("-")[1]) for p in tmp_path.glob("worker-*")]
        assert all(_alive(pid) for pid in workers)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        wait_for(lambda: not any(_alive(pid) for pid in workers))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_the_temporaries_of_gone_processes_are_removed(tmp_path):
    host = atomic._host()
    dead, live = _dead_pid(), os.getppid()
    stale_file = tmp_path / f".case.nii.gz.{host}-{dead}.0123456789ab.tmp.nii.gz"
    stale_dir = tmp_path / f".fold_0.{host}-{dead}.abcd1234.building"
    kept = [
        tmp_path / f".case2.nii.gz.{host}-{live}.0123456789ab.tmp.nii.gz",  # a live writer's
        tmp_path / f".case3.nii.gz.otherhost-{dead}.0123456789ab.tmp",  # another machine's: cannot tell
        tmp_path / "case.nii.gz",
        tmp_path / ".hidden_user_file",
    ]
    stale_file.write_bytes(b"")
    (stale_dir / "sub").mkdir(parents=True)
    for p in kept:
        p.write_bytes(b"x")
    assert stale_temporaries(tmp_path) == sorted([stale_file, stale_dir])
    assert remove_stale_temporaries(tmp_path) == 2
    assert sorted(tmp_path.iterdir()) == sorted(kept)


def test_a_killed_atomic_write_leaves_a_temporary_the_next_run_removes(tmp_path):
    script = f"from autoliver.io.atomic import atomic_path\nimport os, signal\nwith atomic_path({str(tmp_path / 'out.json')!r}) as t:\n" \
             "    t.write_bytes(b'half')\n    os.kill(os.getpid(), signal.SIGKILL)\n"
    assert subprocess.run([sys.executable, "-c", script]).returncode == -signal.SIGKILL
    left = list(tmp_path.iterdir())
    assert len(left) == 1 and left[0].name.startswith(".out.json.")
    assert remove_stale_temporaries(tmp_path) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_a_failed_write_names_its_file_and_leaves_nothing(tmp_path, code):
    target = tmp_path / "results" / "inference_plan.json"
    with pytest.raises(OSError) as info, atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise OSError(code, os.strerror(code))  # what write() raises on a full disk: no file name
    assert info.value.errno == code and info.value.filename == str(target)
    assert list(target.parent.iterdir()) == []


def test_own_messages_are_not_renamed(tmp_path):
    with pytest.raises(FileNotFoundError) as info, atomic_path(tmp_path / "x.zip"):
        raise FileNotFoundError("predictions: not a folder; give the folder")
    assert info.value.filename is None


def test_stale_check_ignores_missing_folders(tmp_path):
    assert stale_temporaries(tmp_path / "absent") == []
    assert remove_stale_temporaries(Path(tmp_path / "absent")) == 0
