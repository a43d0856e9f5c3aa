"""One preprocessed volume through a network: the tile predictor and the whole-volume
softmax (sliding window in 3D, slice by slice in 2D / 2.5D). Shared by end-of-fold validation
and prediction."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from autoliver.infer.sliding_window import Window, predict_slicewise, sliding_window_predict, softmax_
from planning.plans import Configuration


def one_hot_foreground(seg: np.ndarray, n_classes: int) -> np.ndarray:
    """(Z, Y, X) labels -> (n_classes - 1, Z, Y, X) float32 indicators of labels 1..n_classes-1."""
    return np.stack([(seg == c) for c in range(1, n_classes)]).astype(np.float32)


def make_predictor(model: torch.nn.Module, device: torch.device, autocast_dtype: torch.dtype | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The network as a tile predictor returning logits (B, n_classes, *patch) in float32."""

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(x)
        if isinstance(out, (list, tuple)):
            out = out[0]
        return out.float()

    return predict


def predict_volume(predictor: Callable, data: np.ndarray, config: Configuration, n_classes: int, device: torch.device,
                   step: float = 0.5, prev_seg: np.ndarray | None = None, pad_value: float = 0.0,
                   starts: list[list[int]] | None = None, tile: tuple[int, ...] | None = None) -> torch.Tensor:
    """Softmax probabilities (n_classes, Z, Y, X) float32 of one preprocessed (Z, Y, X) volume.

    ``prev_seg`` (Z, Y, X) uint8: a previous stage's labels, given as one-hot channels (cascade).
    The only full-size arrays are the float32 image and the logits, turned into probabilities
    in place. ``starts``: tile starts per network axis (the sliding window's default otherwise);
    ``tile``: the tile size when it is not the training patch (a fully convolutional network).
    """
    image = torch.from_numpy(np.asarray(data, dtype=np.float32))[None]
    extra = None if prev_seg is None else torch.from_numpy(one_hot_foreground(prev_seg, n_classes))
    window = Window(tile or config.patch_size, step=step, n_classes=n_classes, device=device, pad_value=pad_value, starts=starts)
    with torch.inference_mode():
        if config.network_dims == 2:
            logits = predict_slicewise(predictor, image, window, in_slices=config.in_slices, extra=extra)
        else:
            x = image
            if extra is not None:  # one-hot channels of the previous stage are padded with 0
                x, window = torch.cat([image, extra]), window.but(pad_value=[pad_value] + [0.0] * extra.shape[0])
            logits = sliding_window_predict(predictor, x, window)
        return softmax_(logits)
