"""Training options from a configuration: losses against their formulas, optimisers, the
plateau schedule and early stopping as a state machine that resumes exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from autoliver.core.errors import PlanError
from autoliver.train.loss import level_loss, soft_dice
from autoliver.train.objective import Objective, Plateau


def batch(seed=0, n_classes=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, n_classes, 6, 6, generator=g), torch.randint(0, n_classes, (2, 1, 6, 6), generator=g)


def test_losses_match_their_formulas():
    logits, target = batch()
    ce = F.cross_entropy(logits, target[:, 0])
    assert torch.allclose(level_loss("ce", logits, target), ce)
    assert torch.allclose(level_loss("dice", logits, target), 1 - soft_dice(logits, target).mean())
    assert torch.allclose(level_loss("dice_ce", logits, target), ce + 1 - soft_dice(logits, target).mean())
    w = torch.tensor([0.1, 1.0, 7.0])
    manual = -(w[target[:, 0]] * F.log_softmax(logits, 1).gather(1, target).squeeze(1)).sum() / w[target[:, 0]].sum()
    assert torch.allclose(level_loss("ce_median_frequency", logits, target, class_weights=w), manual, atol=1e-6)
    with pytest.raises(ValueError, match="unknown loss"):
        level_loss("focal", logits, target)


def test_objective_from_training_options():
    obj = Objective.of({"loss": "dice", "optimiser": "adam", "lr": 1e-3, "schedule": "plateau", "early_stopping_patience": 10})
    net = torch.nn.Linear(2, 2)
    opt = obj.make_optimiser(net.parameters(), default_lr=1e-2, default_weight_decay=0.0, default_momentum=0.99)
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == 1e-3
    sgd = Objective.of({}).make_optimiser(net.parameters(), 1e-2, 3e-5, 0.99)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["nesterov"] and sgd.param_groups[0]["lr"] == 1e-2
    for bad, words in (({"colour": 1}, "unknown training option"), ({"loss": "focal"}, "loss in"), ({"lr": -1}, "positive"),
                       ({"loss": "ce_median_frequency"}, "class_weights")):
        with pytest.raises(PlanError, match=words):
            Objective.of(bad, "cfg")


def test_plateau_reduces_and_stops_and_resumes_exactly():
    losses = [1.0, 0.9, 0.95, 0.93, 0.92, 0.91, 0.94, 0.96, 0.97, 0.99, 1.0, 1.1]
    p = Plateau(1e-3, factor=0.5, patience=2, stop_patience=6)
    lrs, stops = [], []
    for v in losses:
        p.step(v)
        lrs.append(p.lr)
        stops.append(p.should_stop)
    # best at 0.9 (epoch 1); 3 epochs without improvement -> halve, 3 more -> halve; stop after 6
    assert lrs[:4] == [1e-3] * 4 and lrs[4] == 5e-4 and lrs[7] == 2.5e-4
    assert stops.index(True) == 7
    q = Plateau(1e-3, factor=0.5, patience=2, stop_patience=6)
    for v in losses[:5]:
        q.step(v)
    r = Plateau(1.0, factor=0.5, patience=2, stop_patience=6)
    r.load_state_dict(q.state_dict())
    for v in losses[5:]:
        r.step(v)
    assert r.state_dict() == p.state_dict()
