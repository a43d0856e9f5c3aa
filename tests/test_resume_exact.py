"""Exact resume: a fold interrupted anywhere and resumed ends bit-identical to an
uninterrupted run (weights, optimiser state, log.jsonl metrics but the timings, validation
outputs), with 0 and 2 loader workers; the pieces that make it so (data streams that restart
where they stopped, loaders that leave torch's generator alone, checkpoints that refuse
unsafe or old files, the fault points) one by one.

Interruptions here are in-process: ``autoliver.core.faults`` armed to raise at the N-th pass
of a point, and a new trainer resumes. Real SIGKILLs: tests/test_fault_train.py.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from faults import stale_temporaries, tensor_differences
from helpers import fold_setup, read_log

import autoliver.train.trainer as T
from autoliver.core import faults
from autoliver.core.errors import CheckpointError, UsageError
from autoliver.data.loader import make_train_loader, make_val_loader
from autoliver.io.checkpoint import (
    check_resumable,
    foreign_globals,
    load_checkpoint,
    save_checkpoint,
)
from autoliver.train.options import TrainOptions

pytestmark = pytest.mark.usefixtures("single_thread")

TIMINGS = {"train_s", "epoch_s", "samples_per_s", "data_wait_share", "time", "eta_s", "val_s_per_patch"}
EPOCHS, ITERS = 3, 3


@pytest.fixture()
def no_plot(monkeypatch):
    """progress.png (matplotlib, about a second per epoch here) is not what is compared."""
    monkeypatch.setattr(T, "plot_progress", lambda path, history: None)


def run_fold(ws, out, workers: int, resume: bool = False, stop_at: str | None = None, epochs: int = EPOCHS):
    """Train fold 0 of the tiny 2d configuration into ``out``; with ``stop_at`` ("POINT:N")
    the run is interrupted the N-th time it passes POINT (and must be)."""
    options = TrainOptions(device="cpu", epochs=epochs, iters_per_epoch=ITERS, val_iters=2, n_workers=workers, progress=False,
                           resume=resume, seed=3)
    trainer = T.Trainer(fold_setup(ws, "2d", 0, options, output_dir=out), options)
    if stop_at is None:
        return trainer.run()
    with faults.armed(stop_at), pytest.raises(faults.FaultInjected):
        trainer.run()
    return None


def metrics_only(records: list[dict]) -> list[str]:
    return [json.dumps({k: v for k, v in r.items() if k not in TIMINGS}) for r in records]


def assert_same_fold(a, b):
    """Two fold folders hold the same training outcome, bit for bit (timings aside)."""
    compared = 0
    for name in ("checkpoint_final.pt", "checkpoint_latest.pt", "checkpoint_best.pt"):
        x, y = load_checkpoint(a / name), load_checkpoint(b / name)
        for key in ("weights", "optimiser", "data_position", "epoch", "best_ema", "plateau"):
            diffs, n = tensor_differences(x[key], y[key], key)
            assert not diffs, (name, diffs[:5])
            compared += n
        assert metrics_only(x["history"]) == metrics_only(y["history"]), name
    assert metrics_only(read_log(a / "log.jsonl")) == metrics_only(read_log(b / "log.jsonl"))
    assert json.loads((a / "metrics.json").read_text()) == json.loads((b / "metrics.json").read_text())
    for npz in sorted((a / "validation").glob("*.npz")):
        with np.load(npz) as p, np.load(b / "validation" / npz.name) as q:
            assert p["probabilities"].tobytes() == q["probabilities"].tobytes(), npz.name
    assert not stale_temporaries(b)
    return compared


# ---------------------------------------------------------------- the whole fold, interrupted and resumed

# each resume is interrupted again at the next point, counted from its own start: mid-epoch,
# at a checkpoint's rename, between an epoch's log line and its checkpoint, in the final
# validation; the last run finishes
CHAIN = ("train.iteration:5", "checkpoint.before_rename:1", "train.log_appended:2", "train.validation_case:1")


@pytest.mark.parametrize("workers", [0, 2])
def test_interrupted_runs_resume_bit_identical(tiny_ws, tmp_path, workers, no_plot):
    t0 = time.perf_counter()
    reference = run_fold(tiny_ws, tmp_path / "reference", workers)
    assert reference.epochs == EPOCHS
    out = tmp_path / "interrupted"
    epochs_at_kill = []
    for i, point in enumerate(CHAIN):
        run_fold(tiny_ws, out, workers, resume=i > 0, stop_at=point)
        latest = out / "checkpoint_latest.pt"
        epochs_at_kill.append(load_checkpoint(latest)["epoch"] if latest.is_file() else 0)
    assert epochs_at_kill[0] == 1 and epochs_at_kill[-1] == EPOCHS  # the chain reached every stage of the fold
    result = run_fold(tiny_ws, out, workers, resume=True)
    assert [r["epoch"] for r in read_log(out / "log.jsonl")] == list(range(EPOCHS))
    compared = assert_same_fold(tmp_path / "reference", out)
    assert result.metrics == reference.metrics
    print(f"{workers} workers: {len(CHAIN)} interruptions (checkpointed epochs {epochs_at_kill}), {compared} tensors identical, "
          f"{time.perf_counter() - t0:.1f} s")


@pytest.mark.parametrize("iteration", [1, 3, 4, 8, 9])
def test_interrupted_at_any_iteration(tiny_ws, tmp_path, iteration, no_plot):
    """Interrupted before training iteration k (of 3 epochs x 3), resumed: the final weights
    and optimiser state are those of one uninterrupted run (no final validation, for speed)."""
    ref, out = tmp_path / "reference", tmp_path / "interrupted"
    run_fold(tiny_ws, ref, 0)
    run_fold(tiny_ws, out, 0, stop_at=f"train.iteration:{iteration}")
    done = load_checkpoint(out / "checkpoint_latest.pt")["epoch"] if (out / "checkpoint_latest.pt").is_file() else 0
    assert done == (iteration - 1) // ITERS
    run_fold(tiny_ws, out, 0, resume=True)
    a, b = load_checkpoint(ref / "checkpoint_final.pt"), load_checkpoint(out / "checkpoint_final.pt")
    diffs, n = tensor_differences({k: a[k] for k in ("weights", "optimiser")}, {k: b[k] for k in ("weights", "optimiser")})
    assert not diffs and n >= 2 * len(a["weights"]) - 4, diffs[:5]
    assert metrics_only(read_log(ref / "log.jsonl")) == metrics_only(read_log(out / "log.jsonl"))


class Dropout(torch.nn.Module):
    """Wraps a network with dropout on its input: training draws from torch's generator."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    @property
    def deep_supervision(self) -> bool:
        return self.net.deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, value: bool) -> None:
        self.net.deep_supervision = value

    def forward(self, x):
        return self.net(torch.nn.functional.dropout(x, 0.3, self.training))


def test_a_network_drawing_random_numbers_resumes_exactly_too(tiny_ws, tmp_path, no_plot, monkeypatch):
    """Dropout draws from torch's generator in every iteration: the epoch cut short draws the
    same numbers when it is trained again (2 loader workers, which must not touch it)."""
    real = T.default_components()
    components = T.Components(lambda arch, config, n: Dropout(real.build_network(arch, config, n)), real.make_train_loader,
                              real.make_val_loader)

    def run(out, resume=False, stop_at=None):
        options = TrainOptions(device="cpu", epochs=2, iters_per_epoch=ITERS, val_iters=1, n_workers=2, progress=False, resume=resume,
                               final_validation=False)
        trainer = T.Trainer(fold_setup(tiny_ws, "2d", 0, options, output_dir=out), options, components=components)
        if stop_at is None:
            return trainer.run()
        with faults.armed(stop_at), pytest.raises(faults.FaultInjected):
            trainer.run()
        return None

    run(tmp_path / "a")
    run(tmp_path / "b", stop_at=f"train.iteration:{ITERS + 2}")
    torch.rand(7)  # whatever ran in between
    run(tmp_path / "b", resume=True)
    a, b = load_checkpoint(tmp_path / "a" / "checkpoint_final.pt"), load_checkpoint(tmp_path / "b" / "checkpoint_final.pt")
    diffs, n = tensor_differences(a["weights"], b["weights"])
    assert not diffs and n == len(a["weights"]), diffs[:5]
    # the draws do matter: other numbers for the second epoch give other weights
    monkeypatch.setattr(T, "epoch_torch_seed", lambda seed, rank, epoch: 12345 + epoch)
    run(tmp_path / "c")
    c = load_checkpoint(tmp_path / "c" / "checkpoint_final.pt")
    assert tensor_differences(a["weights"], c["weights"])[0]


def test_extending_a_finished_fold_continues_its_data_streams(tiny_ws, tmp_path, no_plot):
    """2 epochs, then --continue to 3: the third epoch starts both data streams where the
    second left them (its learning rate differs by design: the poly schedule runs over the
    new count)."""
    run_fold(tiny_ws, tmp_path / "short", 0, epochs=2)
    state = load_checkpoint(tmp_path / "short" / "checkpoint_final.pt")
    assert state["data_position"] == {"train_batches": 2 * ITERS, "val_batches": 2 * 2}
    run_fold(tiny_ws, tmp_path / "short", 0, resume=True, epochs=3)
    assert load_checkpoint(tmp_path / "short" / "checkpoint_final.pt")["data_position"] == {"train_batches": 3 * ITERS, "val_batches": 3 * 2}


# ---------------------------------------------------------------- data streams

@pytest.fixture(scope="module")
def data(tiny_ws_module):
    from helpers import fold_setup as setup_of

    s = setup_of(tiny_ws_module, "2d", 0)
    return s.data_folder, list(s.train_cases), s.config


def batches(loader, n):
    with loader:
        return [next(loader) for _ in range(n)]


def same_batches(xs, ys) -> bool:
    return len(xs) == len(ys) and all(torch.equal(x[k], y[k]) for x, y in zip(xs, ys) for k in ("data", "target", "forced"))


def test_a_loader_started_at_k_continues_the_sequence_whatever_the_workers(data):
    folder, cases, config = data
    fresh = batches(make_train_loader(folder, cases, config, seed=11, n_workers=0, batch_size=2), 6)
    for workers in (0, 2):
        loader = make_train_loader(folder, cases, config, seed=11, n_workers=workers, batch_size=2, start=4)
        assert loader.position == 4
        later = batches(loader, 2)
        assert loader.position == 6
        assert same_batches(later, fresh[4:]), workers
    assert same_batches(batches(make_train_loader(folder, cases, config, seed=11, n_workers=2, batch_size=2), 6), fresh)
    assert not same_batches(batches(make_train_loader(folder, cases, config, seed=12, n_workers=0, batch_size=2), 6), fresh)
    val = batches(make_val_loader(folder, cases, config, seed=1), 3)
    assert same_batches(batches(make_val_loader(folder, cases, config, seed=1, start=2), 1), val[2:])
    with pytest.raises(ValueError, match="start"):
        make_train_loader(folder, cases, config, seed=0, n_workers=0, start=-1)


def test_making_a_loader_with_workers_leaves_torchs_generator_alone(data):
    folder, cases, config = data
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    batches(make_train_loader(folder, cases, config, seed=0, n_workers=2, batch_size=2), 1)
    assert torch.equal(torch.rand(4), expected)


def test_epoch_torch_seed_depends_on_seed_rank_and_epoch_only():
    seeds = {T.epoch_torch_seed(s, r, e) for s in (0, 1) for r in (0, 1) for e in (0, 1, 2)}
    assert len(seeds) == 12 and T.epoch_torch_seed(0, 0, 2) == T.epoch_torch_seed(0, 0, 2)
    assert all(0 <= v < 2**63 for v in seeds)


# ---------------------------------------------------------------- checkpoints

class RunsCode:
    """A pickle payload: unpickling it would call exec and create ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_a_checkpoint_with_a_code_payload_is_refused_as_unsafe_and_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "checkpoint_latest.pt"
    torch.save({"weights": {"w": torch.ones(3)}, "epoch": 1, "format_version": 2, "x": RunsCode(marker)}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "refused as unsafe (it holds Python objects that would run code when loaded)" in message
    assert "builtins.exec" in message  # what it would have called
    assert "damaged or truncated" not in message
    assert not marker.exists()  # the payload never ran
    # the same file cut short is damaged, not unsafe
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        load_checkpoint(path)
    assert foreign_globals(path) is None
    path.write_bytes(b"\x80\x02" + b"\x00" * 50)  # a pickle header, then garbage
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        load_checkpoint(path)
    assert not marker.exists()


def test_autoliver_checkpoints_name_no_foreign_objects(tmp_path):
    path = tmp_path / "c.pt"
    state = {"epoch": 0, "weights": {"w": torch.ones(2)}, "rng": T.capture_rng_states(), "history": [{"epoch": 0, "lr": 0.1}],
             "configuration": {"patch_size": (4, 4)}, "data_position": {"train_batches": 1, "val_batches": 0}, "note": b"bytes"}
    save_checkpoint(path, state)
    assert foreign_globals(path) == []
    assert load_checkpoint(path)["data_position"] == state["data_position"]


def test_a_pickle_of_a_class_instance_is_unsafe_too(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"weights": {}, "epoch": 0, "format_version": 2, "setup": TrainOptions()}, path)
    with pytest.raises(CheckpointError, match=r"refused as unsafe.*TrainOptions"):
        load_checkpoint(path)


def test_an_old_format_checkpoint_predicts_but_does_not_resume(tiny_ws, tmp_path, no_plot, caplog):
    out = tmp_path / "fold"
    run_fold(tiny_ws, out, 0, epochs=1)
    latest = out / "checkpoint_latest.pt"
    state = load_checkpoint(latest)
    old = {k: v for k, v in state.items() if k != "data_position"}
    torch.save(dict(old, format_version=1), latest)
    assert load_checkpoint(latest)["format_version"] == 1  # still loads (prediction reads weights only)
    with pytest.raises(CheckpointError) as info:
        run_fold(tiny_ws, out, 0, resume=True, epochs=2)
    message = str(info.value)
    assert str(latest) in message and "format 1" in message and "cannot resume it exactly" in message
    with pytest.raises(CheckpointError, match="format 1"):
        check_resumable(latest, old | {"format_version": 1})
    torch.save(dict(old, format_version=99), latest)
    with pytest.raises(CheckpointError, match="newer autoliver"):
        load_checkpoint(latest)


# ---------------------------------------------------------------- fault points

def test_fault_points_are_inert_unless_armed_and_fire_once_at_the_nth_pass():
    for _ in range(100):
        faults.point("train.iteration")  # not armed: nothing happens
    fired = []
    faults.arm("a:3,b:1", action=lambda name, n: fired.append((name, n)))
    try:
        for _ in range(5):
            faults.point("a")
            faults.point("c")
        assert fired == [("a", 3)] and faults.hits("a") == 5
        faults.point("b")
        assert fired == [("a", 3), ("b", 1)]
    finally:
        faults.disarm()
    faults.point("a")
    assert faults.hits("a") == 0
    with faults.armed("x:2"):
        faults.point("x")
        with pytest.raises(faults.FaultInjected, match="x #2"):
            faults.point("x")
    for bad in ("train.iteration", "x:0", "x:-1", ":3", "x:3,", "x:y"):
        with pytest.raises(UsageError, match=faults.ENV_VAR):
            faults.parse(bad)
    assert faults.arm_from_environment({}) is False and faults.arm_from_environment({faults.ENV_VAR: " "}) is False
    assert faults.parse("train.iteration:17, checkpoint.before_rename:2") == {"train.iteration": 17, "checkpoint.before_rename": 2}
