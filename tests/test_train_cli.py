"""`autoliver train` end to end on a tiny phantom dataset: every configuration, the cascade's
missing-artefact error, resume after SIGKILL, damaged checkpoints, the budget on a simulated
clock, Ctrl-C with loader workers.

Every test trains in its own copy of the tiny workspace (the ``tiny_ws`` fixture, conftest.py),
so no test depends on another's folds or can delete them.
"""

import json
import logging
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import DATASET, FAST, FakeClock, TimedNetwork, default_sigint, read_log, wait_for
from helpers import train_cli as train

from autoliver.cli import main
from autoliver.core.layout import Workspace
from autoliver.io.checkpoint import load_checkpoint
from autoliver.train.schedule import poly_lr

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture()
def ws(tiny_ws):
    """This test's own copy of the tiny workspace (results/ empty)."""
    return tiny_ws


@pytest.mark.slow
def test_every_configuration_trains_from_the_cli(ws, tmp_path, caplog):
    splits = tmp_path / "two_folds.json"
    cases = sorted(p.name[:-5] for p in (ws.preprocessed(DATASET) / "fullres").glob("phantom_*.json"))
    splits.write_text(json.dumps([{"train": cases[:2], "val": cases[2:]}, {"train": cases[2:], "val": cases[:2]}]))
    assert train(ws, "2d", 0, "--epochs", "1", "--iters-per-epoch", "2", "--splits", str(splits)) == 0
    results = ws.results(DATASET)
    assert json.loads((results / "splits.json").read_text())[0]["val"] == cases[2:]
    for config in ("2.5d", "3d_fullres"):
        assert train(ws, config, 0, "--epochs", "1", "--iters-per-epoch", "2") == 0
    for config in ("2d", "2.5d", "3d_fullres"):
        fold = results / config / "fold_0"
        for name in ("checkpoint_latest.pt", "checkpoint_final.pt", "log.jsonl", "progress.png", "metrics.json"):
            assert (fold / name).is_file(), (config, name)
        metrics = json.loads((fold / "metrics.json").read_text())
        assert sorted(metrics["per_case"]) == cases[2:]
        assert 0.0 <= metrics["mean"]["liver"] <= 1.0
        probs = np.load(fold / "validation" / f"{cases[2]}.npz")["probabilities"]
        shape = json.loads((ws.preprocessed(DATASET) / "fullres" / f"{cases[2]}.json").read_text())["shape_after_resampling"]
        assert probs.dtype == np.float16 and probs.shape == (3, *shape)
        assert np.allclose(probs.astype(np.float32).sum(0), 1.0, atol=5e-3)
        rec = read_log(fold / "log.jsonl")
        assert [r["epoch"] for r in rec] == [0]
        assert {"train_loss", "val_loss", "pseudo_dice", "lr", "epoch_s", "samples_per_s", "tumour_share"} <= set(rec[0])
        assert load_checkpoint(fold / "checkpoint_final.pt")["configuration"]["name"] == config
    # training copied the plans into the model folder, so results/<dataset> is self-contained
    assert (results / "plans.json").read_bytes() == (ws.preprocessed(DATASET) / "plans.json").read_bytes()

    # the cascade needs every case's lowres prediction: a clear error naming the command
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert train(ws, "3d_cascade_fullres", 0, "--epochs", "1", "--iters-per-epoch", "1") == 1
    assert "autoliver train -d Dataset900_LiverPhantom 3d_lowres FOLD" in caplog.text and "fold(s) 0, 1" in caplog.text

    for fold in (0, 1):
        assert train(ws, "3d_lowres", fold, "--epochs", "1", "--iters-per-epoch", "2") == 0
    nxt = results / "3d_lowres" / "predicted_next_stage"
    for case in cases:
        import blosc2

        seg = blosc2.open(str(nxt / f"{case}.b2nd"))[...]
        shape = json.loads((ws.preprocessed(DATASET) / "fullres" / f"{case}.json").read_text())["shape_after_resampling"]
        assert seg.dtype == np.uint8 and list(seg.shape) == shape and seg.max() <= 2
    assert train(ws, "3d_cascade_fullres", 0, "--epochs", "1", "--iters-per-epoch", "2") == 0
    state = load_checkpoint(results / "3d_cascade_fullres" / "fold_0" / "checkpoint_final.pt")
    first_conv = next(v for k, v in state["weights"].items() if v.ndim == 5)
    assert first_conv.shape[1] == 3  # image + 2 one-hot channels of the lowres prediction


@pytest.mark.slow
@pytest.mark.subprocess
def test_resume_after_sigkill_continues_exactly(ws):
    cmd = [sys.executable, "-m", "autoliver.cli", "train", "-d", DATASET, "3d_fullres", "1", "--workspace", str(ws.root),
           "--device", "cpu", "--epochs", "500", "--iters-per-epoch", "4", *FAST]
    fold = ws.results(DATASET) / "3d_fullres" / "fold_1"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        two_epochs = lambda: (fold / "checkpoint_latest.pt").is_file() and (fold / "log.jsonl").is_file() and len(read_log(fold / "log.jsonl")) >= 2
        wait_for(lambda: two_epochs() or proc.poll() is not None)  # no time limit of its own: a hang guard only
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(1.0)  # into the next epoch (where the kill lands does not matter: any point must resume exactly)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    state = load_checkpoint(fold / "checkpoint_latest.pt")  # intact despite the kill
    done = state["epoch"]
    assert done >= 2
    before = {r["epoch"]: r for r in state["history"]}

    target = done + 2
    assert train(ws, "3d_fullres", 1, "--epochs", str(target), "--iters-per-epoch", "4", "--continue") == 0
    rec = read_log(fold / "log.jsonl")
    assert [r["epoch"] for r in rec] == list(range(target))  # no epoch missing or doubled
    for r in rec[:done]:
        assert r == before[r["epoch"]]  # history up to the checkpoint kept as it was
    final = load_checkpoint(fold / "checkpoint_final.pt")
    assert final["epoch"] == target and [r["epoch"] for r in final["history"]] == list(range(target))
    # lr follows the poly schedule over the new epoch count after the resume
    assert rec[done]["lr"] == pytest.approx(1e-2 * (1 - done / target) ** 0.9)
    # extending a finished fold trains the extra epochs
    assert train(ws, "3d_fullres", 1, "--epochs", str(target + 1), "--iters-per-epoch", "4", "--continue", "--no-validation") == 0
    assert [r["epoch"] for r in read_log(fold / "log.jsonl")] == list(range(target + 1))


def test_existing_or_damaged_checkpoint_is_a_clear_error(ws, caplog):
    fold = ws.results(DATASET) / "2d" / "fold_1"
    assert train(ws, "2d", 1, "--epochs", "1", "--iters-per-epoch", "1", "--no-validation") == 0
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert train(ws, "2d", 1, "--epochs", "1", "--iters-per-epoch", "1") == 1
    assert "--continue" in caplog.text and "checkpoint_latest.pt" in caplog.text
    latest = fold / "checkpoint_latest.pt"
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 3])
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert train(ws, "2d", 1, "--epochs", "2", "--iters-per-epoch", "1", "--continue") == 1
    assert str(latest) in caplog.text and "damaged or truncated" in caplog.text
    assert "Traceback" not in caplog.text
    # a checkpoint holding arbitrary pickled objects is refused by weights_only loading
    torch.save({"weights": {}, "epoch": 1, "format_version": 1, "evil": Workspace(ws.root)}, latest)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert train(ws, "2d", 1, "--epochs", "2", "--iters-per-epoch", "1", "--continue") == 1
    assert str(latest) in caplog.text


def test_unknown_configuration_and_missing_plans(workspace, ws, caplog):
    with caplog.at_level(logging.ERROR):
        assert main(["train", "-d", DATASET, "3d_nonsense", "0", "--workspace", str(ws.root)]) == 1
        assert main(["train", "-d", "Dataset777_None", "3d_fullres", "0", "--workspace", str(workspace.root)]) == 1
    assert "3d_nonsense" in caplog.text


def test_budget_minutes_fits_epochs_and_finishes(ws, monkeypatch):
    """``--budget-minutes`` through the CLI, with the real network, loaders and validation but
    simulated time: each training iteration costs 1.5 s, each inference patch 0.15 s. The run
    ends within 3 % of the budget, with epochs shortened to fit and the schedule decayed to ~0."""
    import autoliver.train.trainer as T

    clock = FakeClock()
    real = T.default_components

    def components(clock_arg=None):
        c = real(clock)
        return T.Components(lambda arch, config, n: TimedNetwork(c.build_network(arch, config, n), clock, 1.5, 0.15),
                            c.make_train_loader, c.make_val_loader, clock)

    monkeypatch.setattr(T, "default_components", components)
    budget_s = 240.0
    assert train(ws, "2d", 0, "--budget-minutes", str(budget_s / 60), "--epochs", "1000", "--iters-per-epoch", "250") == 0
    fold = ws.results(DATASET) / "2d" / "fold_0"
    rec = read_log(fold / "log.jsonl")
    assert len(rec) >= 2 and rec[-1]["planned_epochs"] == len(rec)  # the plan ended where training did
    assert rec[0]["iters"] < 250  # epochs were shortened to fit the budget
    iters = sum(r["iters"] for r in rec)
    assert rec[-1]["lr_last"] == pytest.approx(poly_lr(iters - 1, iters, 1e-2))  # the schedule's last step
    print(f"CLI budget {budget_s:.0f} s at 1.5 s/iteration (2d): ended at {clock.elapsed:.1f} s, {len(rec)} epochs of {rec[0]['iters']}, {iters} iterations")
    assert abs(clock.elapsed - budget_s) <= 0.03 * budget_s, clock.elapsed
    assert (fold / "metrics.json").is_file() and (fold / "checkpoint_final.pt").is_file()


@pytest.mark.slow
@pytest.mark.subprocess
def test_ctrl_c_stops_cleanly_with_loader_workers(ws):
    import psutil

    fold = ws.results(DATASET) / "2.5d" / "fold_1"
    cmd = [sys.executable, "-m", "autoliver.cli", "train", "-d", DATASET, "2.5d", "1", "--workspace", str(ws.root), "--device", "cpu",
           "--epochs", "500", "--iters-per-epoch", "3", "--threads", "1", "-np", "2", "--no-progress", "--val-iters", "1"]
    # SIGINT's default action even when this test runs in the background (where the shell ignores it, and children inherit that)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=default_sigint)
    try:
        wait_for(lambda: (fold / "checkpoint_latest.pt").is_file() or proc.poll() is not None)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert len(workers) >= 2
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        code = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 130
    assert "interrupted" in proc.stderr.read().decode()
    gone, alive = psutil.wait_procs(workers, timeout=120)  # hang guard: they go within a second
    assert not alive, [p.pid for p in alive]  # no orphaned loader workers
    assert not [p.name for p in fold.iterdir() if p.name.startswith(".")]  # no half-written file
    state = load_checkpoint(fold / "checkpoint_latest.pt")
    logged = [r["epoch"] for r in read_log(fold / "log.jsonl")]
    # the log line is written just before the checkpoint: at most one epoch ahead (a resume trims it)
    assert logged in (list(range(state["epoch"])), list(range(state["epoch"] + 1)))


def test_fold_all_with_another_network_family(ws):
    assert train(ws, "2d", "all", "--arch", "resenc", "--epochs", "1", "--iters-per-epoch", "1") == 0
    fold = ws.results(DATASET) / "2d" / "fold_all"
    state = load_checkpoint(fold / "checkpoint_final.pt")
    assert state["network"]["arch"] == "resenc" and state["fold"] == "all"
    assert not (fold / "metrics.json").exists()  # no held-out cases
    assert train(ws, "2d", "all", "--arch", "nonsense", "--epochs", "1", "--iters-per-epoch", "1") == 2  # a usage error naming the choices
