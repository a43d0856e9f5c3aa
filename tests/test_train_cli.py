"""`autoliver train` end to end on a tiny phantom dataset: every configuration, the cascade's
missing-artefact error, resume after SIGKILL, damaged checkpoints.

The plan is shrunk by hand (tiny patches and networks) so that a whole epoch takes seconds on
two CPU cores; 3d_lowres/3d_cascade_fullres are added to it (the phantoms are too small for
the planner to want them) and the lowres data preprocessed with the same runner.
"""

import json
import logging
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from autoliver import api
from autoliver.cli import main
from autoliver.core.layout import Workspace
from autoliver.examples.phantom import write_phantom_dataset
from autoliver.io.checkpoint import load_checkpoint
from autoliver.preprocess.runner import preprocess_dataset
from planning.plans import Plans

DATASET = "Dataset900_LiverPhantom"
FAST = ["--threads", "1", "-np", "0", "--no-progress", "--val-iters", "1"]


def tiny(config, patch, features, batch):
    n, d = len(features), config.network_dims
    return replace(config, patch_size=tuple(patch), features_per_stage=tuple(features), batch_size=batch, n_stages=n,
                   kernel_sizes=((3,) * d,) * n, strides=((1,) * d,) + ((2,) * d,) * (n - 1))


def build_tiny_workspace(root, n_cases=4, shape=(24, 48, 48), spacing=(8.0, 8.0, 8.0), seed=0, lowres=True,
                         patch3d=(16, 32, 32), features=(4, 8, 16), batch3d=2, patch2d=None, features2d=None, batch2d=4) -> Workspace:
    """Phantoms -> plan_and_preprocess (cpu) -> hand-shrunk plan (+ 3d_lowres and cascade)."""
    ws = Workspace(root)
    write_phantom_dataset(ws.raw, n_cases, np.random.default_rng(seed), shape=shape, spacing=spacing, dataset_name=DATASET)
    summary = api.plan_and_preprocess(DATASET, ws, device="cpu", options=api.StageOptions(n_jobs=1, progress=False))
    plans = Plans.load(summary.plans_path)
    c = dict(plans.configurations)
    c["2d"] = tiny(c["2d"], patch2d or patch3d[1:], features2d or features, batch2d)
    c["2.5d"] = tiny(c["2.5d"], patch2d or patch3d[1:], features2d or features, batch2d)
    c["3d_fullres"] = tiny(c["3d_fullres"], patch3d, features, batch3d)
    spacings = dict(plans.data_spacings)
    if lowres:
        low_spacing = tuple(2 * s for s in c["3d_fullres"].spacing)
        c["3d_lowres"] = replace(tiny(c["3d_fullres"], (8, 16, 16), features, 2), name="3d_lowres", data_identifier="lowres", spacing=low_spacing)
        c["3d_cascade_fullres"] = replace(c["3d_fullres"], name="3d_cascade_fullres", previous_stage="3d_lowres")
        spacings["lowres"] = low_spacing
    plans = replace(plans, configurations=c, data_spacings=spacings)
    api.write_plans(plans, summary.plans_path)
    if lowres:
        dataset = api.validate(DATASET, ws, api.StageOptions(progress=False))
        preprocess_dataset(dataset, plans, ws.preprocessed(DATASET), ["lowres"], progress=False)
    return ws


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return build_tiny_workspace(tmp_path_factory.mktemp("train_ws"))


def train(ws, config, fold, *extra):
    return main(["train", "-d", DATASET, config, str(fold), "--workspace", str(ws.root), "--device", "cpu", *FAST, *extra])


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


def test_resume_after_sigkill_continues_exactly(ws):
    cmd = [sys.executable, "-m", "autoliver.cli", "train", "-d", DATASET, "3d_fullres", "1", "--workspace", str(ws.root),
           "--device", "cpu", "--epochs", "500", "--iters-per-epoch", "4", *FAST]
    fold = ws.results(DATASET) / "3d_fullres" / "fold_1"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if (fold / "checkpoint_latest.pt").is_file() and (fold / "log.jsonl").is_file() and len(read_log(fold / "log.jsonl")) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(1.0)  # into the next epoch
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
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


def test_unknown_configuration_and_missing_plans(tmp_path, ws, caplog):
    with caplog.at_level(logging.ERROR):
        assert main(["train", "-d", DATASET, "3d_nonsense", "0", "--workspace", str(ws.root)]) == 1
        assert main(["train", "-d", "Dataset777_None", "3d_fullres", "0", "--workspace", str(tmp_path)]) == 1
    assert "3d_nonsense" in caplog.text


def test_budget_minutes_fits_epochs_and_finishes(ws):
    fold = ws.results(DATASET) / "2d" / "fold_0"
    import shutil

    shutil.rmtree(fold, ignore_errors=True)
    budget_s = 12.0
    t0 = time.perf_counter()
    assert train(ws, "2d", 0, "--budget-minutes", str(budget_s / 60), "--epochs", "1000", "--iters-per-epoch", "250") == 0
    wall = time.perf_counter() - t0
    rec = read_log(fold / "log.jsonl")
    assert len(rec) >= 2 and rec[-1]["planned_epochs"] == len(rec)  # the plan ended where training did
    assert rec[0]["iters"] < 250  # epochs were shortened to fit the budget
    assert sum(r["epoch_s"] for r in rec) <= budget_s + max(r["epoch_s"] for r in rec)
    assert rec[-1]["lr"] < 0.5 * rec[0]["lr"]  # the schedule decayed within the budget
    assert (fold / "metrics.json").is_file() and (fold / "checkpoint_final.pt").is_file()
    assert wall < budget_s + 60


def test_ctrl_c_stops_cleanly_with_loader_workers(ws):
    import psutil

    fold = ws.results(DATASET) / "2.5d" / "fold_1"
    cmd = [sys.executable, "-m", "autoliver.cli", "train", "-d", DATASET, "2.5d", "1", "--workspace", str(ws.root), "--device", "cpu",
           "--epochs", "500", "--iters-per-epoch", "3", "--threads", "1", "-np", "2", "--no-progress", "--val-iters", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not (fold / "checkpoint_latest.pt").is_file():
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert len(workers) >= 2
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 130
    assert "interrupted" in proc.stderr.read().decode()
    gone, alive = psutil.wait_procs(workers, timeout=10)
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
    assert train(ws, "2d", "all", "--arch", "nonsense", "--epochs", "1", "--iters-per-epoch", "1") == 2  # ValueError naming the choices
