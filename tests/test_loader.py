"""The loader: batches, determinism, cascade channels, worker errors and clean shutdown."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import blosc2
import numpy as np
import psutil
import pytest
import torch
from helpers import default_sigint

from autoliver.api import StageOptions, plan_and_preprocess
from autoliver.core.errors import MissingArtefactError
from autoliver.core.layout import Workspace
from autoliver.data import DataLoadingError, make_train_loader, make_val_loader
from autoliver.examples.phantom import write_phantom_dataset
from autoliver.preprocess.storage import list_cases, load_case
from planning.plans import Plans

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("ws"))
    root = write_phantom_dataset(ws.raw, 3, np.random.default_rng(1), shape=(40, 96, 96), spacing=(4.0, 4.0, 4.0))
    summary = plan_and_preprocess(root, ws, configurations=["2d", "2.5d", "3d_fullres"], device="cpu",
                                  options=StageOptions(progress=False))
    folder = summary.folders["fullres"]
    return Plans.load(summary.plans_path), folder, list_cases(folder)


def first_batches(loader, n=3):
    with loader:
        return [next(loader) for _ in range(n)]


def same(a, b) -> bool:
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def gone(pids, timeout=120.0) -> list[int]:
    """Pids still alive (zombies count as gone) after waiting up to ``timeout`` s (a guard
    against waiting forever, not a speed check: the pids usually go within a second)."""
    end = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > end:
            return alive
        time.sleep(0.2)


def test_batch_shapes_and_dtypes(prep):
    plans, folder, cases = prep
    for name in ("2d", "2.5d", "3d_fullres"):
        config = plans.configurations[name]
        with make_train_loader(folder, cases, config, seed=0, n_workers=0) as loader:
            batch = next(loader)
        b, patch = config.batch_size, tuple(config.patch_size)
        assert batch["data"].shape == (b, config.in_slices) + patch and batch["data"].dtype == torch.float32
        assert batch["target"].shape == (b, 1) + patch and batch["target"].dtype == torch.int64
        assert batch["tumour"].shape == (b,) and batch["tumour"].dtype == torch.bool
        assert torch.equal(batch["tumour"], (batch["target"] == 2).flatten(1).any(1))
        assert set(batch["target"].unique().tolist()) <= {0, 1, 2}
        assert torch.isfinite(batch["data"]).all()


def test_same_seed_same_batches(prep):
    plans, folder, cases = prep
    config = plans.configurations["2.5d"]  # augmentation's reproducibility in 3D: test_augment

    def run(seed, workers):
        return first_batches(make_train_loader(folder, cases, config, seed=seed, n_workers=workers, batch_size=2))

    zero = run(5, 0)
    assert same(zero, run(5, 0))
    assert not same(zero, run(6, 0))
    assert same(zero, run(5, 1))  # one worker draws what the main process draws
    two = run(5, 2)
    assert same(two, run(5, 2))
    val = first_batches(make_val_loader(folder, cases, config, seed=0))
    assert same(val, first_batches(make_val_loader(folder, cases, config, seed=0)))


def test_cascade_channels_follow_the_augmented_target(prep, tmp_path):
    plans, folder, cases = prep
    prev = tmp_path / "prev"
    prev.mkdir()
    for c in cases:  # a previous stage that predicted the ground truth
        seg = load_case(folder, c, mmap=False)[1]
        blosc2.asarray(seg, urlpath=str(prev / f"{c}.b2nd"), mode="w")
    config = plans.configurations["3d_fullres"]
    with make_train_loader(folder, cases, config, seed=1, n_workers=0, prev_stage_folder=prev, batch_size=3) as loader:
        for _ in range(4):
            batch = next(loader)
            assert batch["data"].shape[1] == 3  # image + one-hot liver, tumour
            t = batch["target"][:, 0]
            assert torch.equal(batch["data"][:, 1], (t == 1).float())
            assert torch.equal(batch["data"][:, 2], (t == 2).float())
    with pytest.raises(MissingArtefactError, match="previous"):
        make_train_loader(folder, cases, config, seed=1, n_workers=0, prev_stage_folder=tmp_path)


def test_bad_arguments(prep):
    plans, folder, cases = prep
    config = plans.configurations["2d"]
    with pytest.raises(MissingArtefactError, match="nope"):
        make_train_loader(folder, ["nope"], config, seed=0, n_workers=0)
    for kw in ({"oversample_foreground": 1.5}, {"tumour_share": -0.1}, {"n_workers": -1}):
        with pytest.raises(ValueError):
            make_train_loader(folder, cases, config, seed=0, **{"n_workers": 0, **kw})
    with pytest.raises(ValueError):
        make_train_loader(folder, [], config, seed=0, n_workers=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_worker_error_names_the_case_and_stops_workers(prep, tmp_path, workers):
    plans, folder, cases = prep
    broken = tmp_path / "fullres"
    shutil.copytree(folder, broken)
    (broken / f"{cases[0]}_seg.b2nd").write_bytes(b"not a blosc2 array" * 10)
    loader = make_train_loader(broken, [cases[0]], plans.configurations["2d"], seed=0, n_workers=workers)
    pids = loader.worker_pids()
    assert len(pids) == workers
    with pytest.raises(DataLoadingError, match=cases[0]):
        for _ in range(5):  # the error surfaces within a few batches, it does not hang the loop
            next(loader)
    assert gone(pids) == []
    with pytest.raises(DataLoadingError, match="closed"):
        next(loader)
    loader.close()  # idempotent


def test_close_stops_workers(prep):
    plans, folder, cases = prep
    config = plans.configurations["2d"]
    with make_train_loader(folder, cases, config, seed=0, n_workers=2) as loader:
        next(loader)
        pids = loader.worker_pids()
        assert len(pids) == 2
    assert gone(pids) == []
    loader = make_train_loader(folder, cases, config, seed=0, n_workers=2)
    pids = loader.worker_pids()
    with pytest.raises(RuntimeError, match="in the loop"):
        with loader:
            next(loader)
            raise RuntimeError("in the loop")
    assert gone(pids) == []


SCRIPT = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from autoliver.data import make_train_loader
    from autoliver.preprocess.storage import list_cases
    from planning.plans import Plans
    folder, mode = Path(sys.argv[1]), sys.argv[2]
    config = Plans.load(folder.parent / "plans.json").configurations["3d_fullres"]
    loader = make_train_loader(folder, list_cases(folder), config, seed=0, n_workers=2)
    next(loader)
    print(json.dumps(loader.worker_pids()), flush=True)
    if mode == "exception":
        raise RuntimeError("boom in the training loop")
    for batch in loader:
        time.sleep(0.05)
""")


# in-process: the normal end (close, ``with``) in test_close_stops_workers; each mode here costs a fresh interpreter
@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("mode", ["ctrl-c", "sigterm", "sigkill", "exception"])
def test_no_orphans_whatever_ends_the_main_process(prep, tmp_path, mode):
    _, folder, _ = prep
    script = tmp_path / "run_loader.py"
    script.write_text(SCRIPT)
    # default_sigint: Ctrl-C must work even when the tests run in the background (where SIGINT is ignored, and inherited so)
    proc = subprocess.Popen([sys.executable, str(script), str(folder), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True, preexec_fn=default_sigint)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 300)  # hang guard
        assert ready, "loader did not start"
        pids = json.loads(proc.stdout.readline())
        assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
        if mode in ("sigterm", "sigkill"):
            os.kill(proc.pid, {"sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}[mode])
        elif mode == "ctrl-c":  # the terminal sends SIGINT to the whole process group
            os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=300)  # hang guard
        err = proc.stderr.read()
        assert gone(pids) == [], f"{mode}: workers left behind; stderr:\n{err}"
        assert rc != 0
        if mode == "exception":
            assert "boom in the training loop" in err
        if mode == "ctrl-c":
            assert "KeyboardInterrupt" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
