"""Dice + cross-entropy with deep supervision (nnU-Net's recipe, re-derived), and the other
losses a configuration may ask for (``LOSSES``).

Logits are (B, n_classes, *spatial), targets (B, 1, *spatial) int64 labels. Deep supervision:
the network returns one logit map per decoder level, full resolution first; level i gets
weight 1/2^i, the coarsest 0 (it is too coarse to help), normalised to sum 1. The target is
downsampled to each level's shape by nearest-neighbour sampling at voxel centres.

The soft Dice term is over the foreground classes only, computed over the whole batch
("batch Dice": one Dice per class from all patches together, stabler with small batches and
patches without a class) unless ``batch_dice=False``; the loss is ``CE + (1 - mean Dice)``,
which is 0 for a perfect, confident prediction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

SMOOTH = 1e-5


def deep_supervision_weights(n_levels: int) -> list[float]:
    """[1, 1/2, 1/4, ..., 0] normalised to sum 1 (a single level gets weight 1)."""
    if n_levels < 1:
        raise ValueError(f"n_levels must be >= 1, got {n_levels}")
    w = [1.0 / 2**i for i in range(n_levels)]
    if n_levels > 1:
        w[-1] = 0.0
    total = sum(w)
    return [v / total for v in w]


def downsample_target(target: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """(B, 1, *spatial) int labels -> (B, 1, *shape), nearest voxel centre."""
    if tuple(target.shape[2:]) == tuple(shape):
        return target
    return F.interpolate(target.float(), size=tuple(shape), mode="nearest-exact").to(target.dtype)


def soft_dice(logits: torch.Tensor, target: torch.Tensor, batch_dice: bool = True, smooth: float = SMOOTH) -> torch.Tensor:
    """Soft Dice per foreground class (mean over the batch unless ``batch_dice``): shape (n_classes - 1,)."""
    probs = torch.softmax(logits.float(), dim=1)[:, 1:]
    onehot = torch.zeros_like(probs)
    labels = target[:, 0].long()
    for c in range(1, logits.shape[1]):
        onehot[:, c - 1] = labels == c
    axes = tuple(range(2, probs.ndim))
    inter = (probs * onehot).sum(axes)
    denom = probs.sum(axes) + onehot.sum(axes)
    if batch_dice:
        inter, denom = inter.sum(0), denom.sum(0)
    dice = (2 * inter + smooth) / torch.clamp(denom + smooth, min=1e-8)
    return dice if batch_dice else dice.mean(0)


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, batch_dice: bool = True) -> torch.Tensor:
    """CE + (1 - mean foreground soft Dice) for one output level."""
    ce = F.cross_entropy(logits.float(), target[:, 0].long())
    return ce + (1.0 - soft_dice(logits, target, batch_dice).mean())


LOSSES = ("dice_ce", "dice", "ce", "ce_median_frequency")


def level_loss(kind: str, logits: torch.Tensor, target: torch.Tensor, batch_dice: bool = True,
               class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """One output level's loss: ``dice_ce`` (default), ``dice`` (1 - mean foreground soft
    Dice), ``ce``, or ``ce_median_frequency`` (cross-entropy weighted by ``class_weights``)."""
    if kind == "dice_ce":
        return dice_ce_loss(logits, target, batch_dice)
    if kind == "dice":
        return 1.0 - soft_dice(logits, target, batch_dice).mean()
    if kind == "ce":
        return F.cross_entropy(logits.float(), target[:, 0].long())
    if kind == "ce_median_frequency":
        if class_weights is None:
            raise ValueError("ce_median_frequency needs class weights (the plan's training.class_weights)")
        return F.cross_entropy(logits.float(), target[:, 0].long(), weight=class_weights.to(logits.device, torch.float32))
    raise ValueError(f"unknown loss {kind!r}; known: {', '.join(LOSSES)}")


class DeepSupervisionLoss:
    """Weighted sum of a level loss (``level_loss``; Dice + CE by default) over the levels of a
    deep-supervised output."""

    def __init__(self, n_levels: int, batch_dice: bool = True, kind: str = "dice_ce", class_weights: Sequence[float] | None = None):
        if kind not in LOSSES:
            raise ValueError(f"unknown loss {kind!r}; known: {', '.join(LOSSES)}")
        self.weights = deep_supervision_weights(n_levels)
        self.batch_dice = batch_dice
        self.kind = kind
        self.class_weights = None if class_weights is None else torch.tensor([float(w) for w in class_weights])

    def __call__(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            outputs = [outputs]
        if len(outputs) != len(self.weights):
            raise ValueError(f"expected {len(self.weights)} output levels, got {len(outputs)}")
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for w, out in zip(self.weights, outputs):
            # a zero-weight level still enters the graph (DDP expects every parameter used)
            total = total + w * level_loss(self.kind, out, downsample_target(target, out.shape[2:]), self.batch_dice, self.class_weights)
        return total


def confusion_counts(logits: torch.Tensor, target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(n_classes - 1, 3) float64 tensor of [tp, fp, fn] per foreground class of argmax(logits)."""
    pred = logits.argmax(1)
    labels = target[:, 0]
    rows = []
    for c in range(1, n_classes):
        p, t = pred == c, labels == c
        rows.append([(p & t).sum(), (p & ~t).sum(), (~p & t).sum()])
    return torch.tensor([[float(v) for v in r] for r in rows], dtype=torch.float64)
