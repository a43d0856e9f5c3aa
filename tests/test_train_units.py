"""Loss, schedules, splits and checkpoints: against references and invariants."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from autoliver.evaluate.overlap import case_dice
from autoliver.evaluate.overlap import mask_dice as dice
from autoliver.io.checkpoint import CheckpointError, capture_rng_states, load_checkpoint, restore_rng_states, save_checkpoint
from autoliver.train.loss import DeepSupervisionLoss, confusion_counts, deep_supervision_weights, downsample_target, soft_dice
from autoliver.train.schedule import BudgetPlan, poly_lr
from autoliver.train.splits import SplitsError, fold_cases, holding_fold, load_or_create_splits, make_splits


def test_deep_supervision_weights_halve_and_drop_the_coarsest():
    w = deep_supervision_weights(4)
    assert w == pytest.approx(np.array([1, 0.5, 0.25, 0]) / 1.75)
    assert deep_supervision_weights(1) == [1.0]


def test_soft_dice_against_numpy_reference():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 6, 7)
    target = torch.randint(0, 3, (2, 1, 5, 6, 7))
    p = torch.softmax(logits, 1).numpy()
    t = target.numpy()[:, 0]
    ref = []
    for c in (1, 2):
        oh = (t == c).astype(float)
        ref.append((2 * (p[:, c] * oh).sum() + 1e-5) / (p[:, c].sum() + oh.sum() + 1e-5))
    assert soft_dice(logits, target).numpy() == pytest.approx(ref, rel=1e-5)


def test_loss_is_near_zero_for_a_confident_correct_prediction_and_levels_use_downsampled_targets():
    target = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    target[:, :, 2:6, 2:6, 2:6] = 1
    target[:, :, 3:5, 3:5, 3:5] = 2
    perfect = F.one_hot(target[:, 0], 3).permute(0, 4, 1, 2, 3).float() * 50
    coarse_t = downsample_target(target, (4, 4, 4))
    assert coarse_t.shape == (1, 1, 4, 4, 4) and coarse_t.dtype == torch.long
    assert torch.equal(coarse_t, target[:, :, 1::2, 1::2, 1::2])  # nearest voxel centre of a 2x grid
    coarse = F.one_hot(coarse_t[:, 0], 3).permute(0, 4, 1, 2, 3).float() * 50
    loss = DeepSupervisionLoss(2)
    assert float(loss([perfect, coarse], target)) < 1e-3
    wrong = perfect.roll(1, dims=1)
    assert float(loss([wrong, coarse], target)) > 1.0
    with pytest.raises(ValueError):
        loss([perfect], target)


def test_confusion_counts():
    target = torch.tensor([0, 1, 1, 2, 2, 0]).reshape(1, 1, 6)
    pred = torch.tensor([0, 1, 2, 2, 0, 1])
    logits = F.one_hot(pred, 3).T[None].float()
    counts = confusion_counts(logits, target, 3)
    assert counts.tolist() == [[1, 1, 1], [1, 1, 1]]


def test_dice_lits_rule():
    a = np.zeros((4, 4), bool)
    assert dice(a, a) == 1.0
    b = a.copy()
    b[0, 0] = True
    assert dice(a, b) == 0.0
    ref = np.array([[0, 1, 2], [1, 1, 0]])
    pred = np.array([[0, 1, 1], [1, 0, 0]])
    d = case_dice(pred, ref)
    assert d["liver"] == pytest.approx(2 * 3 / (3 + 4)) and d["tumour"] == 0.0


def test_poly_lr():
    assert poly_lr(0, 10, 0.01) == 0.01
    assert poly_lr(5, 10, 0.01) == pytest.approx(0.01 * 0.5**0.9)
    assert poly_lr(10, 10, 0.01) == 0.0
    lrs = [poly_lr(e, 50, 1.0) for e in range(50)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_budget_plan_fits_epochs_to_measured_speed():
    plan = BudgetPlan.start(budget_s=1000.0, max_epochs=1000, iters_per_epoch=250)
    # 1 s per iteration: 900 s of training hold 3.6 epochs of 250 -> shorten epochs to get 10
    fitted = plan.fit_iterations(1.0)
    assert fitted.iters_per_epoch == 90 and fitted.planned_epochs == 10 and fitted.s_per_iter == 1.0
    # 2 epochs done in 185 s, 1 s per iteration and 2 s per epoch besides: the 715 s left hold 7
    # epochs of 92 s, and the 71 s after them a last epoch of 69 iterations
    upd = fitted.refit(epochs_done=2, used_s=185.0, s_per_iter=1.0, overhead_s=2.0)
    assert (upd.planned_epochs, upd.last_iters) == (10, 69)
    assert [upd.epoch_iters(e) for e in range(10)] == [90] * 9 + [69]
    assert upd.total_iters(2, iters_done=180) == 180 + 7 * 90 + 69
    # a remainder too small for an epoch of its own (11 s) goes to the last full epoch
    longer = fitted.refit(epochs_done=2, used_s=245.0, s_per_iter=1.0, overhead_s=2.0)
    assert (longer.planned_epochs, longer.last_iters) == (9, 90 + 11)
    # less than a full epoch left: one short epoch; nothing left: no more epochs, never fewer than done
    assert (fitted.refit(5, 880.0, 1.5, 2.0).planned_epochs, fitted.refit(5, 880.0, 1.5, 2.0).last_iters) == (6, 12)
    assert fitted.refit(5, 899.0, 1.5, 2.0).planned_epochs == 5
    # --epochs bounds the plan
    assert replace(fitted, max_epochs=6).refit(2, 185.0, 1.0, 2.0).planned_epochs == 6
    assert BudgetPlan.from_json(upd.to_json()) == upd
    with pytest.raises(ValueError):
        BudgetPlan.start(0, 10, 10)


def test_splits_deterministic_disjoint_and_stored(tmp_path):
    ids = [f"case_{i:02d}" for i in range(12)]
    s1 = make_splits(ids)
    assert s1 == make_splits(list(reversed(ids)))
    vals = [c for f in s1 for c in f["val"]]
    assert sorted(vals) == ids  # every case validated exactly once
    for f in s1:
        assert not set(f["train"]) & set(f["val"]) and set(f["train"]) | set(f["val"]) == set(ids)
    splits, path = load_or_create_splits(tmp_path, ids)
    assert json.loads(path.read_text()) == splits == s1
    assert fold_cases(splits, "all", ids) == (ids, ids)
    assert holding_fold(splits, s1[3]["val"][0]) == 3
    with pytest.raises(ValueError):
        fold_cases(splits, 7, ids)


def test_custom_splits_validated(tmp_path):
    ids = ["a", "b", "c", "d"]
    custom = tmp_path / "mine.json"
    custom.write_text(json.dumps([{"train": ["a", "b"], "val": ["c", "d"]}, {"train": ["c", "d"], "val": ["a", "b"]}]))
    splits, _ = load_or_create_splits(tmp_path / "res", ids, custom)
    assert len(splits) == 2 and splits[0]["val"] == ["c", "d"]
    bad = tmp_path / "bad.json"
    for content, msg in [([{"train": ["a", "x"], "val": ["c"]}], "not in the preprocessed"), ([{"train": ["a"], "val": ["a"]}], "both train and val"),
                         ({"train": []}, "JSON list"), ([{"train": ["a"], "val": []}], "empty")]:
        bad.write_text(json.dumps(content))
        with pytest.raises(SplitsError, match=msg):
            load_or_create_splits(tmp_path / "other", ids, bad)
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"train": ["a", "c"], "val": ["b", "d"]}]))
    with pytest.raises(SplitsError, match="differs"):
        load_or_create_splits(tmp_path / "res", ids, other)


def test_checkpoint_round_trip_with_rng_and_damage(tmp_path):
    import random

    rng_state = capture_rng_states()
    a = (torch.rand(3), np.random.rand(3), random.random())
    state = {"epoch": 3, "weights": {"w": torch.arange(4.0)}, "history": [{"epoch": 0, "lr": 0.01}], "rng": rng_state, "configuration": {"patch_size": (4, 4)}}
    path = tmp_path / "checkpoint_latest.pt"
    save_checkpoint(path, state)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_latest.pt"]  # no temporary left behind
    loaded = load_checkpoint(path)
    restore_rng_states(loaded["rng"])
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert loaded["epoch"] == 3 and loaded["history"] == state["history"]

    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="checkpoint_latest.pt.*damaged or truncated"):
        load_checkpoint(path)
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_budget_plan_counts_validation_batches():
    # 1 s per iteration, 250 + 50 validation batches at 0.35 each = 267.5 s per epoch:
    # 900 s of training hold 3.36 epochs -> both shortened by the same factor to fit 10
    plan = BudgetPlan.start(budget_s=1000.0, max_epochs=1000, iters_per_epoch=250, val_iters=50)
    fitted = plan.fit_iterations(1.0)
    epoch_s = fitted.iters_per_epoch + fitted.val_iters * fitted.val_cost
    assert 10 * epoch_s <= plan.training_s
    assert fitted.iters_per_epoch == 84 and fitted.val_iters == 16
    assert BudgetPlan.from_json(fitted.to_json()) == fitted


def test_budget_reserves_the_estimated_final_validation():
    plan = BudgetPlan.start(budget_s=600.0, max_epochs=1000, iters_per_epoch=250)
    assert plan.training_s == pytest.approx(540.0)  # the 10 % reserve, until the final validation is estimated
    assert replace(plan, final_s=200.0).training_s == pytest.approx(400.0)  # a larger early guess
    assert replace(plan, final_s=20.0, final_known=True).training_s == pytest.approx(580.0)  # the estimate replaces the reserve
    assert replace(plan, final_s=0.0, final_known=True).training_s == pytest.approx(600.0)  # fold 'all': nothing to validate
    assert replace(plan, final_s=1e6, final_known=True).training_s == pytest.approx(120.0)  # training keeps a fifth


# ----------------------------------------------------------------- the budget, on a simulated clock
CHECKPOINT_S = 2.0  # simulated seconds per checkpoint file
# (configuration, budget, seconds per training iteration): one iteration is 0.1 % to 1 % of the budget
SPEEDS = [("2d", 1000.0, 1.0), ("2d", 1000.0, 3.0), ("2d", 1000.0, 10.0), ("3d_fullres", 1000.0, 2.0), ("3d_fullres", 1000.0, 8.0)]


def simulated_components(clock, s_iter, s_tile, stop_after=None):
    """A 1x1-conv network that advances ``clock`` per training iteration and per inference
    patch, and constant in-memory batches: the trainer's timing logic alone, in milliseconds."""
    from helpers import PointwiseNet, TimedNetwork, constant_loader, in_channels

    from autoliver.train.trainer import Components

    def build(arch, config, n_classes):
        return TimedNetwork(PointwiseNet(config.network_dims, in_channels(config), n_classes), clock, s_iter, s_tile, stop_after)

    return Components(build, constant_loader, constant_loader, clock)


@pytest.fixture()
def budget_run(tiny_ws, tmp_path, fake_clock, monkeypatch, single_thread):
    """Run a trainer on the simulated clock; each checkpoint file costs CHECKPOINT_S seconds."""
    from helpers import fold_setup

    import autoliver.train.trainer as T
    from autoliver.train.options import TrainOptions

    real_save = T.save_checkpoint

    def save(path, state):
        fake_clock.advance(CHECKPOINT_S)
        real_save(path, state)

    monkeypatch.setattr(T, "save_checkpoint", save)
    monkeypatch.setattr(T, "plot_progress", lambda path, history: None)  # matplotlib: real seconds, no simulated ones

    def run(configuration, budget_s, s_iter, s_tile, resume=False, stop_after=None, **options):
        opts = TrainOptions(device="cpu", budget_minutes=budget_s / 60, n_workers=0, progress=False, resume=resume,
                            **{"epochs": 1000, "iters_per_epoch": 100, "val_iters": 10, **options})
        setup = fold_setup(tiny_ws, configuration, 0, opts, output_dir=tmp_path / "fold_0")
        trainer = T.Trainer(setup, opts, components=simulated_components(fake_clock, s_iter, s_tile, stop_after))
        t0 = fake_clock()
        try:
            result = trainer.run()
        finally:
            trainer.simulated_s = fake_clock() - t0
        return trainer, result

    return run


@pytest.mark.parametrize("configuration, budget_s, s_iter", SPEEDS)
def test_budget_is_used_to_the_end_on_a_simulated_clock(budget_run, configuration, budget_s, s_iter):
    """Every iteration costs ``s_iter`` simulated seconds, every inference patch a tenth of it,
    every checkpoint CHECKPOINT_S: the run (epochs, checkpoints, final validation) ends within
    3 % of the budget, the poly schedule ends with the last iteration."""
    trainer, result = budget_run(configuration, budget_s, s_iter, s_iter / 10)
    total = trainer.simulated_s
    rec = result.history
    print(f"budget {budget_s:.0f} s at {s_iter} s/iteration ({configuration}): ended at {total:.1f} s ({total / budget_s:.3f}), "
          f"{len(rec)} epochs, {sum(r['iters'] for r in rec)} iterations, final validation {trainer.budget.final_s:.0f} s")
    assert abs(total - budget_s) <= 0.03 * budget_s, total
    assert rec[-1]["planned_epochs"] == len(rec)  # the plan ended where training did
    regular = trainer.budget.iters_per_epoch
    assert all(r["iters"] == regular for r in rec[1:-1])  # only the last epoch differs
    iters = sum(r["iters"] for r in rec)
    assert rec[-1]["lr_last"] == pytest.approx(poly_lr(iters - 1, iters, 1e-2))  # ~0: the schedule's last step
    assert all(a["lr"] >= b["lr"] for a, b in zip(rec, rec[1:]))
    assert result.metrics is not None and (result.output_dir / "checkpoint_final.pt").is_file()


def test_budget_accounting_survives_a_resume(budget_run, fake_clock, tmp_path):
    """A run killed mid-epoch and resumed with ``--continue``: the time in the checkpoint counts
    against the budget, and the resumed run ends where one run would have."""
    from helpers import Interrupted

    budget_s, s_iter = 1000.0, 2.0
    start = fake_clock()
    with pytest.raises(Interrupted):
        budget_run("2d", budget_s, s_iter, s_iter / 10, stop_after=200)
    killed_at = fake_clock() - start
    state = load_checkpoint(tmp_path / "fold_0" / "checkpoint_latest.pt")
    done, used = state["epoch"], state["train_seconds"]
    # the time up to the checkpoint counts (its iterations and more), the part after it is lost
    assert done >= 2 and sum(r["iters"] for r in state["history"]) * s_iter < used < killed_at
    fake_clock.advance(60.0)  # the restart (not budget time: nothing runs)
    trainer, result = budget_run("2d", budget_s, s_iter, s_iter / 10, resume=True)
    total = used + trainer.simulated_s
    rec = result.history
    print(f"resumed after epoch {done} ({used:.0f} s used): ended at {total:.1f} s of {budget_s:.0f} s, {len(rec)} epochs")
    assert abs(total - budget_s) <= 0.03 * budget_s, total
    assert [r["epoch"] for r in rec] == list(range(len(rec))) and rec[:done] == state["history"]
    assert rec[-1]["planned_epochs"] == len(rec) and all(r["iters"] == rec[1]["iters"] for r in rec[1:-1])
    assert rec[done]["lr"] <= rec[done - 1]["lr_last"]  # the schedule goes on where it stopped
    iters = sum(r["iters"] for r in rec)
    assert rec[-1]["lr_last"] == pytest.approx(poly_lr(iters - 1, iters, 1e-2))
