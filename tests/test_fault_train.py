"""`autoliver train` killed with SIGKILL at seeded points, again and again, then resumed with
``--continue``: it ends exactly where an uninterrupted run ends (final, latest and best
weights and optimiser state, log.jsonl metrics but the timings, validation outputs), with
each epoch logged once and no temporary file left in the fold folder.

One child process per run (forked from a fork server, tests/faults.py); each is armed to kill
itself at the next point of a seeded chain, counted from its own start: before a training
iteration, between an epoch's log line and its checkpoints, between a checkpoint's temporary
file and its rename (best, latest and final), and in the end-of-fold validation. The runs
alternate between 0 and 2 loader workers (the reference uses 0): the data stream does not
depend on the number of workers.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import pytest
from faults import kill_points, run_cli, stale_temporaries, tensor_differences
from helpers import DATASET, copy_workspace, read_log

from autoliver.io.checkpoint import load_checkpoint

pytestmark = pytest.mark.subprocess

EPOCHS, ITERS = 4, 6
SEED = 20240607  # of the kill points
N_ITERATION_KILLS = 15
TIMINGS = {"train_s", "epoch_s", "samples_per_s", "data_wait_share", "time", "eta_s", "val_s_per_patch"}


def train_args(ws, workers: int, resume: bool) -> list[str]:
    return ["train", "-d", DATASET, "2d", "0", "--workspace", str(ws.root), "--device", "cpu", "--threads", "1", "-np", str(workers),
            "--no-progress", "--val-iters", "1", "--epochs", str(EPOCHS), "--iters-per-epoch", str(ITERS), "--seed", "5",
            *(["--continue"] if resume else [])]


@dataclass(frozen=True)
class Kill:
    """A point on the fold's timeline: ``epoch`` (EPOCHS: after training), ``order`` within it
    (iterations 1..ITERS, then 100 log line, 101 best, 102 latest; after training 0 final
    checkpoint, 1 validation)."""

    epoch: int
    order: int

    def spec(self, done: int, writes: list[int]) -> str:
        """The child's POINT:N for a child that resumes after ``done`` checkpointed epochs;
        ``writes[e]``: checkpoint files epoch e writes (2 when best improved, as in the reference)."""
        before = sum(writes[done:self.epoch])  # checkpoint writes of this child before this epoch's
        if self.epoch == EPOCHS:
            return "checkpoint.before_rename:%d" % (before + 1) if self.order == 0 else "train.validation_case:1"
        if self.order <= ITERS:
            return f"train.iteration:{(self.epoch - done) * ITERS + self.order}"
        if self.order == 100:
            return f"train.log_appended:{self.epoch - done + 1}"
        return f"checkpoint.before_rename:{before + (self.order - 100 if writes[self.epoch] == 2 else 1)}"


def chain(writes: list[int]) -> list[Kill]:
    """The seeded kill points, in the order the fold reaches them."""
    rng = np.random.default_rng(SEED)
    kills = [Kill((g - 1) // ITERS, (g - 1) % ITERS + 1) for g in kill_points(SEED, N_ITERATION_KILLS, 1, EPOCHS * ITERS)]
    for e in sorted(rng.choice(EPOCHS, size=3, replace=False)):
        kills.append(Kill(int(e), 100))
        kills += [Kill(int(e), 101 + i) for i in range(writes[e])]
    kills += [Kill(EPOCHS, 0), Kill(EPOCHS, 1)]
    return sorted(kills, key=lambda k: (k.epoch, k.order))


def metrics_only(records):
    return [json.dumps({k: v for k, v in r.items() if k not in TIMINGS}) for r in records]


def test_train_survives_seeded_sigkills(tiny_ws, tmp_path):
    t0 = time.perf_counter()
    reference_ws, ws = tiny_ws, copy_workspace(tiny_ws, tmp_path / "killed_ws")
    logs = tmp_path / "logs"
    logs.mkdir()
    first = run_cli(train_args(reference_ws, 0, False), log_path=logs / "reference.log")
    assert first.exitcode == 0, first.tail()
    ref = reference_ws.results(DATASET) / "2d" / "fold_0"
    fold = ws.results(DATASET) / "2d" / "fold_0"
    history = load_checkpoint(ref / "checkpoint_final.pt")["history"]
    best_so_far, writes = None, []
    for r in history:  # which epochs also wrote checkpoint_best.pt (the trainer's rule)
        ema = r["pseudo_dice_ema"]
        improved = ema is not None and (best_so_far is None or ema > best_so_far)
        writes.append(2 if improved else 1)
        best_so_far = ema if improved else best_so_far

    kills = chain(writes)
    assert len(kills) >= 20
    survived = []
    for i, kill in enumerate(kills):
        done = load_checkpoint(fold / "checkpoint_latest.pt")["epoch"] if (fold / "checkpoint_latest.pt").is_file() else 0
        spec = kill.spec(done, writes)
        run = run_cli(train_args(ws, 2 * (i % 2), resume=True), log_path=logs / f"run{i:02d}.log", kill_at=spec)
        assert run.killed, f"kill {i} ({kill}, {spec} after {done} epochs): exit code {run.exitcode}\n{run.tail()}"
        survived.append(spec)
    last = run_cli(train_args(ws, 2, resume=True), log_path=logs / "last.log")
    assert last.exitcode == 0, last.tail()

    compared = 0
    for name in ("checkpoint_final.pt", "checkpoint_latest.pt", "checkpoint_best.pt"):
        a, b = load_checkpoint(ref / name), load_checkpoint(fold / name)
        for key in ("weights", "optimiser", "data_position", "epoch", "best_ema"):
            diffs, n = tensor_differences(a[key], b[key], key)
            assert not diffs, (name, diffs[:5])
            compared += n
        assert metrics_only(a["history"]) == metrics_only(b["history"]), name
    rec = read_log(fold / "log.jsonl")
    assert [r["epoch"] for r in rec] == list(range(EPOCHS))  # each epoch once
    assert metrics_only(rec) == metrics_only(read_log(ref / "log.jsonl"))
    assert json.loads((fold / "metrics.json").read_text()) == json.loads((ref / "metrics.json").read_text())
    npz = sorted((ref / "validation").glob("*.npz"))
    assert npz
    for p in npz:
        with np.load(p) as x, np.load(fold / "validation" / p.name) as y:
            assert x["probabilities"].tobytes() == y["probabilities"].tobytes(), p.name
    assert stale_temporaries(fold) == []
    print(f"{len(survived)} SIGKILLs survived ({', '.join(survived)}); {compared} tensors bit-identical; "
          f"{time.perf_counter() - t0:.1f} s")
