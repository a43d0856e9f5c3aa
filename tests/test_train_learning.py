"""Training learns: a short CPU training on phantoms reaches a validation liver Dice >= 0.85.

The 2d configuration with a small network (8..64 features) and whole-slice patches: about
600 iterations, under a minute on two idle cores.

The Dice is the end-of-fold validation's (metrics.json): every held-out case predicted whole
with the sliding window and compared with its reference in the preprocessed grid.
"""

import json
import time

import pytest
from helpers import DATASET, build_tiny_workspace, torch_threads

from autoliver import api
from autoliver.train.options import TrainOptions

LIVER_DICE_MIN = 0.85


@pytest.mark.slow
def test_short_training_reaches_liver_dice(tmp_path):
    ws = build_tiny_workspace(tmp_path / "ws", n_cases=6, shape=(32, 64, 64), spacing=(6.0, 6.0, 6.0), seed=1, lowres=False,
                              patch2d=(56, 56), features2d=(8, 16, 32, 64), batch2d=8)
    with torch_threads(1):  # one core computes, the other makes batches
        t0 = time.perf_counter()  # for the message only
        result = api.train(DATASET, "2d", 0, ws, TrainOptions(epochs=30, iters_per_epoch=20, val_iters=2, n_workers=1, progress=False, seed=0))
        seconds = time.perf_counter() - t0
    metrics = json.loads((result.output_dir / "metrics.json").read_text())
    assert metrics["n_cases"] == 2
    liver = metrics["mean"]["liver"]
    print(f"learning test: mean validation liver Dice {liver:.4f} after {seconds:.0f} s ({metrics['per_case']})")
    assert liver >= LIVER_DICE_MIN, metrics
    history = [json.loads(line) for line in (result.output_dir / "log.jsonl").read_text().splitlines()]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
