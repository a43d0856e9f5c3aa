"""A disk that fills up during predict (a small tmpfs, where this machine lets the tests mount
one; else the write is mocked to fail with ENOSPC): one message naming the file, exit 1, the
cases finished before it intact, nothing half-written, and a re-run with room finishes."""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
from helpers import DATASET

from autoliver.cli import main
from autoliver.io import images
from autoliver.io.images import read_image

pytestmark = pytest.mark.usefixtures("single_thread")

PREDICT = ["-c", "2d", "-f", "0", "--no-tta", "--no-roi", "--device", "cpu", "--no-progress"]


@contextlib.contextmanager
def small_disk(size_kib: int):
    """A tmpfs of ``size_kib`` KiB, or None where mounting is not allowed."""
    where = Path("/tmp") / f"autoliver-full-{uuid.uuid4().hex[:8]}"
    where.mkdir()
    mounted = shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(where)], capture_output=True).returncode == 0
    try:
        yield where if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", str(where)], capture_output=True)
        shutil.rmtree(where, ignore_errors=True)


def _check_run(model_ws, images_dir, out, caplog) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        rc = main(["predict", "-i", str(images_dir), "-o", str(out), "-m", str(model_ws.results(DATASET)), *PREDICT])
    assert rc == 1
    assert "No space left on device" in caplog.text and str(out) in caplog.text
    assert [p for p in out.iterdir() if p.name.startswith(".")] == []  # nothing half-written
    done = sorted(p.name[: -len(".nii.gz")] for p in out.glob("*.nii.gz"))
    for case in done:  # every finished case is whole: its label map reads and its report is there
        labels, _ = read_image(out / f"{case}.nii.gz")
        assert labels.dtype == np.uint8 and (out / f"{case}.json").is_file()
    return done


def test_disk_full_during_predict(model_ws, tmp_path, caplog, monkeypatch):
    images_dir = model_ws.raw / DATASET / "imagesTr"
    n_cases = len(list(images_dir.iterdir()))
    with small_disk(12) as disk:
        if disk is None:  # no tmpfs here: the third write fails as a full disk would
            out, calls = tmp_path / "out", []
            real = images.sitk.WriteImage

            def full_after_two(image, name, *a):
                calls.append(name)
                if len(calls) > 2:
                    raise RuntimeError("ITK ERROR: NiftiImageIO: Write: No space left on device")
                return real(image, name, *a)

            monkeypatch.setattr(images.sitk, "WriteImage", full_after_two)
            monkeypatch.setattr(images.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 20, 1 << 20, 0))
        else:
            out = disk / "out"
        done = _check_run(model_ws, images_dir, out, caplog)
        assert len(done) < n_cases
        kept = {c: (out / f"{c}.nii.gz").read_bytes() for c in done}
        monkeypatch.undo()
        room = tmp_path / "room"
        shutil.copytree(out, room)
    assert main(["predict", "-i", str(images_dir), "-o", str(room), "-m", str(model_ws.results(DATASET)), *PREDICT]) == 0
    assert len(list(room.glob("*.nii.gz"))) == n_cases
    assert all((room / f"{c}.nii.gz").read_bytes() == b for c, b in kept.items())  # finished cases were not redone


def test_write_image_refuses_to_keep_a_truncated_file(tmp_path, monkeypatch):
    """ITK's NIfTI writer reports a full disk only on stderr and leaves a short file: it must
    not be renamed into place."""
    real = images.sitk.WriteImage

    def short_write(image, name, *a):
        real(image, name, *a)
        data = Path(name).read_bytes()
        Path(name).write_bytes(data[: len(data) // 2])

    monkeypatch.setattr(images.sitk, "WriteImage", short_write)
    array = np.zeros((4, 8, 8), np.uint8)
    with pytest.raises(OSError) as info:
        images.write_image(tmp_path / "a.nii.gz", array, images.Geometry.from_json(
            {"shape": [4, 8, 8], "spacing": [1, 1, 1], "origin": [0, 0, 0], "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}))
    assert info.value.filename == str(tmp_path / "a.nii.gz") and info.value.errno in (errno.ENOSPC, errno.EIO)
    assert list(tmp_path.iterdir()) == []


def test_read_only_output_is_refused_before_any_network_runs(model_ws, caplog, monkeypatch):
    images_dir = model_ws.raw / DATASET / "imagesTr"
    ran = []
    import autoliver.infer.runner as runner

    monkeypatch.setattr(runner, "predict_case", lambda *a, **k: ran.append(1))  # must never be reached
    with small_disk(64) as disk:
        if disk is None:
            pytest.skip("no tmpfs can be mounted here")
        (disk / "out").mkdir()
        assert subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True).returncode == 0
        with caplog.at_level(logging.ERROR):
            rc = main(["predict", "-i", str(images_dir), "-o", str(disk / "out"), "-m", str(model_ws.results(DATASET)), *PREDICT])
    assert rc == 1 and ran == []
    assert "Read-only file system" in caplog.text and str(disk / "out") in caplog.text
