"""Sliding-window prediction with Gaussian importance weighting.

Array layout: an image is (C, *spatial) with spatial (Z, Y, X) or (Y, X); a batch of images
that share one tiling is (N, C, *spatial). The window visits positions spaced by at most
``step`` x patch along each axis, the last one flush with the far border, so every voxel is
covered. Each tile's output is multiplied by a Gaussian centred on the tile (sigma = patch/8,
peak 1, floored at its smallest non-zero value so that no voxel gets weight 0) and the sum is
divided by the summed weights. Inputs smaller than the patch are padded with ``pad_value``
(use the value the training loader pads with: the normalised air level) and the output
cropped back.

The predictor is any callable from (B, C, *patch) to (B, n_classes, *patch): a network in
eval mode, an ensemble, a mirroring wrapper. Tiles are computed on ``device`` and stitched on
the image's own device in float32, so a GPU computes while the volume stays in host memory.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

Predictor = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Window:
    """How to tile: the patch (spatial axes), the step as a fraction of it, the classes the
    predictor returns, where tiles are computed (``device``, ``dtype``), Gaussian weighting,
    tile positions per predictor call, the padding value (one, or one per channel) and
    optional tile starts per axis (default :func:`tile_starts`; given starts must cover the
    image, e.g. a larger volume's tiling restricted to a box) and optional per-axis weights
    (``axis_weights``, one sequence of patch length per axis; their outer product replaces the
    Gaussian, e.g. another tool's importance map)."""

    patch_size: tuple[int, ...]
    step: float = 0.5
    n_classes: int = 3
    device: torch.device | str | None = None
    dtype: torch.dtype = torch.float32
    gaussian: bool = True
    tiles_per_call: int = 1
    pad_value: float | Sequence[float] = 0.0
    starts: Sequence[Sequence[int]] | None = None
    axis_weights: Sequence[Sequence[float]] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if self.tiles_per_call < 1:
            raise ValueError(f"tiles_per_call must be >= 1, got {self.tiles_per_call}")
        if not 0 < self.step <= 1:
            raise ValueError(f"step must be in (0, 1], got {self.step}")

    def but(self, **changes) -> Window:
        """A copy with some fields changed."""
        return replace(self, **changes)


def tile_starts(size: int, patch: int, step: float) -> list[int]:
    """Start indices along one axis: evenly spread, at most ``step * patch`` apart, covering [0, size)."""
    if patch <= 0 or size <= 0:
        raise ValueError(f"size and patch must be positive, got {size}, {patch}")
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1], got {step}")
    if size <= patch:
        return [0]
    n = math.ceil((size - patch) / (patch * step)) + 1
    return sorted({int(round(v)) for v in np.linspace(0, size - patch, n)})


def _round_up(n: int, divisor: int) -> int:
    return -(-int(n) // int(divisor)) * int(divisor)


def throughput_tiling(shape: Sequence[int], patch: Sequence[int], divisor: Sequence[int], max_voxels: int,
                      step: float = 0.5) -> tuple[tuple[int, ...], list[list[int]]]:
    """The tiling over a volume of ``shape`` that computes the fewest voxels, for a fully
    convolutional network trained on ``patch``: (tile, starts per axis).

    With k tiles along an axis of s voxels, neighbours overlap by at least (1 - ``step``) x
    patch (so every voxel lies that half-overlap inside some tile, as with the patch-sized
    window) and the tile is rounded up to ``divisor`` (the network's total stride); a tile is
    never smaller than the patch unless the axis itself is (then the axis rounded up). Of the
    tile counts whose tile has at most ``max_voxels`` (the patch when none has), the one with
    the fewest computed voxels (tiles x tile voxels) wins, then the fewest tiles.
    """
    dims = len(shape)
    if not (len(patch) == len(divisor) == dims):
        raise ValueError(f"shape {tuple(shape)}, patch {tuple(patch)} and divisor {tuple(divisor)} must have the same axes")
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1], got {step}")
    if min(shape) < 1 or min(patch) < 1 or min(divisor) < 1:
        raise ValueError(f"shape, patch and divisor must be positive, got {tuple(shape)}, {tuple(patch)}, {tuple(divisor)}")

    def options(axis: int) -> list[tuple[int, int]]:
        """(count, tile) along one axis, from one tile until the tile reaches the patch."""
        s, d = int(shape[axis]), int(divisor[axis])
        p = _round_up(patch[axis], d)
        floor = min(p, _round_up(s, d))
        overlap = int(round((1 - step) * patch[axis]))
        out, k = [], 1
        while True:
            t = max(floor, _round_up(math.ceil((s + (k - 1) * overlap) / k), d))
            if not out or t < out[-1][1]:
                out.append((k, t))
            if t <= floor:
                return out
            k += 1

    best = None
    for combo in itertools.product(*(options(a) for a in range(dims))):
        tile = [t for _, t in combo]
        voxels = math.prod(tile)
        count = math.prod(k for k, _ in combo)
        fits = voxels <= max_voxels
        rank = (not fits, count * voxels if fits else voxels, count)
        if best is None or rank < best[0]:
            best = (rank, combo)
    combo = best[1]
    tile = tuple(t for _, t in combo)
    starts = []
    for a, (k, t) in enumerate(combo):
        span = int(shape[a]) - t
        starts.append([0] if span <= 0 or k == 1 else sorted({int(round(v)) for v in np.linspace(0, span, k)}))
    return tile, starts


def gaussian_axes(patch_size: Sequence[int], sigma_scale: float = 1.0 / 8) -> list[torch.Tensor]:
    """One float64 Gaussian per axis (peak 1); their outer product is ``gaussian_weights``."""
    axes = []
    for p in patch_size:
        x = torch.arange(p, dtype=torch.float64) - (p - 1) / 2.0
        sigma = max(p * sigma_scale, 1e-3)
        axes.append(torch.exp(-0.5 * (x / sigma) ** 2))
    return axes


def _outer(axes: Sequence[torch.Tensor]) -> torch.Tensor:
    g = axes[0]
    for a in axes[1:]:
        g = g[..., None] * a
    return g


def gaussian_weights(patch_size: Sequence[int], sigma_scale: float = 1.0 / 8) -> torch.Tensor:
    """Gaussian importance map of ``patch_size`` (float32, peak 1, no zeros)."""
    g = _outer(gaussian_axes(patch_size, sigma_scale))
    g = g / g.max()
    g = torch.clamp(g, min=float(g[g > 0].min()))
    return g.to(torch.float32)


def softmax_(logits: torch.Tensor, dim: int = 0, chunk: int = 8) -> torch.Tensor:
    """Softmax over ``dim`` of (C, Z, ...) in place, ``chunk`` slices of axis 1 at a time
    (no second full-size copy); returns ``logits``."""
    if dim != 0:
        raise ValueError("softmax_ works over the class axis 0")
    for z0 in range(0, logits.shape[1], chunk):
        part = logits[:, z0 : z0 + chunk]
        part.copy_(torch.softmax(part, dim=0))
    return logits


def argmax_labels(probs: torch.Tensor | np.ndarray, chunk: int = 8) -> np.ndarray:
    """(C, Z, ...) scores -> uint8 argmax labels (Z, ...), ``chunk`` slices at a time (no int64 volume)."""
    if isinstance(probs, torch.Tensor) and probs.device.type != "cpu":
        return probs.argmax(0).to(torch.uint8).cpu().numpy()
    out = np.empty(tuple(probs.shape[1:]), dtype=np.uint8)
    for z0 in range(0, probs.shape[1], chunk):
        part = probs[:, z0 : z0 + chunk]
        part = part.numpy() if isinstance(part, torch.Tensor) else np.asarray(part)
        # running maximum with strict ">": the first maximum wins, as in argmax, and it is
        # ~40x faster than torch's CPU argmax over the class axis
        best, labels = part[0], np.zeros(part.shape[1:], dtype=np.uint8)
        for c in range(1, part.shape[0]):
            better = part[c] > best
            labels[better] = c
            best = np.where(better, part[c], best)
        out[z0 : z0 + chunk] = labels
    return out


def _pad_to(images: torch.Tensor, patch: Sequence[int], value: float | Sequence[float] = 0.0) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad the spatial axes of (N, C, *spatial) up to ``patch``, centred, with ``value`` (one
    number, or one per channel); return the padded tensor and the crop that undoes it."""
    spatial = images.shape[2:]
    pads, crop = [], []
    for s, p in zip(spatial, patch):
        total = max(0, p - s)
        lo = total // 2
        pads.append((lo, total - lo))
        crop.append(slice(lo, lo + s))
    if not any(lo or hi for lo, hi in pads):
        return images, tuple(crop)
    flat = [v for lo_hi in reversed(pads) for v in lo_hi]  # F.pad wants the last axis first
    if isinstance(value, (int, float)):
        return F.pad(images, flat, mode="constant", value=float(value)), tuple(crop)
    v = torch.as_tensor(list(value), dtype=images.dtype, device=images.device)
    if v.numel() != images.shape[1]:
        raise ValueError(f"pad_value has {v.numel()} entries for {images.shape[1]} channels")
    v = v.reshape(1, -1, *([1] * len(spatial)))
    return F.pad(images - v, flat, mode="constant", value=0.0) + v, tuple(crop)


def sliding_window_predict_batch(predictor: Predictor, images: torch.Tensor, window: Window) -> torch.Tensor:
    """Predict (N, C, *spatial) -> (N, n_classes, *spatial) float32, all N images tiled alike.

    Each predictor call gets ``window.tiles_per_call`` tile positions x N images; given
    ``window.starts`` make a box get exactly the result of the larger volume they come from.
    """
    patch, n_classes, starts = window.patch_size, window.n_classes, window.starts
    if images.ndim != len(patch) + 2:
        raise ValueError(f"images must be (N, C, *spatial) with {len(patch)} spatial axes for patch {patch}, got shape {tuple(images.shape)}")
    device = torch.device(window.device) if window.device is not None else images.device
    dtype, tiles_per_call = window.dtype, window.tiles_per_call
    padded, crop = _pad_to(images, patch, window.pad_value)
    n = padded.shape[0]
    spatial = padded.shape[2:]
    stitch = padded.device
    out = torch.zeros((n, n_classes, *spatial), dtype=torch.float32, device=stitch)
    # weights and tile positions are both products over the axes, so the summed weight is the
    # outer product of per-axis sums: no full-size weight volume is kept
    if window.axis_weights is not None:
        axes = [torch.as_tensor(np.asarray(a, dtype=np.float64)) for a in window.axis_weights]
        if [len(a) for a in axes] != list(patch):
            raise ValueError(f"axis_weights of lengths {[len(a) for a in axes]} do not fit the patch {patch}")
    else:
        axes = gaussian_axes(patch) if window.gaussian else [torch.ones(p, dtype=torch.float64) for p in patch]
    if starts is None:
        starts = [tile_starts(s, p, window.step) for s, p in zip(spatial, patch)]
    else:
        starts = [sorted(int(v) for v in st) for st in starts]
        for st, s, p in zip(starts, spatial, patch):
            if not st or st[0] != 0 or st[-1] != s - p or any(b - a > p for a, b in zip(st, st[1:])):
                raise ValueError(f"tile starts {st} do not cover an axis of {s} voxels with patch {p}")
    weight_dev = _outer(axes).to(device=device, dtype=torch.float32)
    norms = []
    for a, st, s in zip(axes, starts, spatial):
        acc = torch.zeros(s, dtype=torch.float64)
        for s0 in st:
            acc[s0 : s0 + len(a)] += a
        norms.append(acc)
    positions = list(itertools.product(*starts))
    for i in range(0, len(positions), tiles_per_call):
        chunk = positions[i : i + tiles_per_call]
        slices = [tuple(slice(s, s + p) for s, p in zip(pos, patch)) for pos in chunk]
        tiles = torch.cat([padded[(slice(None), slice(None), *sl)] for sl in slices]).to(device=device, dtype=dtype)
        pred = predictor(tiles)
        if tuple(pred.shape) != (len(chunk) * n, n_classes, *patch):
            raise ValueError(f"predictor returned shape {tuple(pred.shape)}, expected {(len(chunk) * n, n_classes, *patch)}")
        pred = (pred.float() * weight_dev).to(stitch)
        for k, sl in enumerate(slices):
            out[(slice(None), slice(None), *sl)] += pred[k * n : (k + 1) * n]
    inner = _outer(norms[1:]).to(torch.float32).to(stitch) if len(norms) > 1 else None
    for i0 in range(0, spatial[0], 8):  # divide by the summed weights, a few slices at a time
        first = norms[0][i0 : i0 + 8].to(torch.float32).to(stitch)
        norm = first.reshape(-1, *([1] * (len(spatial) - 1))) * inner if inner is not None else first
        out[:, :, i0 : i0 + 8] /= norm
    return out[(slice(None), slice(None), *crop)]


def sliding_window_predict(predictor: Predictor, image: torch.Tensor, window: Window) -> torch.Tensor:
    """Predict one image (C, *spatial) -> (n_classes, *spatial) float32 (Gaussian-weighted mean
    of the predictor's outputs: logits or probabilities, whichever it returns)."""
    if image.ndim != len(window.patch_size) + 1:
        raise ValueError(f"image must be (C, *spatial) with {len(window.patch_size)} spatial axes for patch {window.patch_size}, got shape {tuple(image.shape)}")
    return sliding_window_predict_batch(predictor, image[None], window)[0]


def stack_slices(volume: torch.Tensor, z: Sequence[int], k: int) -> torch.Tensor:
    """(C, Z, Y, X) -> (len(z), C * k, Y, X): for each slice index the k slices centred on it,
    as channels (channel-major: all k slices of channel 0 first), edges replicated."""
    if k < 1 or k % 2 == 0:
        raise ValueError(f"k must be a positive odd number of slices, got {k}")
    half = k // 2
    n_z = volume.shape[1]
    idx = torch.tensor([[min(max(i + d, 0), n_z - 1) for d in range(-half, half + 1)] for i in z], dtype=torch.long)
    stacked = volume[:, idx]  # (C, len(z), k, Y, X)
    return stacked.permute(1, 0, 2, 3, 4).reshape(len(z), volume.shape[0] * k, *volume.shape[2:])


def predict_slicewise(predictor: Predictor, volume: torch.Tensor, window: Window, in_slices: int = 1, extra: torch.Tensor | None = None,
                      slices_per_call: int = 8, slices: Sequence[int] | None = None) -> torch.Tensor:
    """A 2D predictor over a volume: (C, Z, Y, X) -> (n_classes, Z, Y, X) float32.

    Slices go through the 2D sliding window ``slices_per_call`` at a time; with ``in_slices``
    = k > 1 (2.5d) each slice's input is the k slices around it. ``extra`` (E, Z, Y, X) adds
    per-slice channels after the image channels (a previous stage's one-hot prediction).
    ``slices``: predict only these slice indices; the output is then (n_classes, len(slices), Y, X).
    ``window``: the in-plane tiling (its ``starts``, when given, are in-plane tile starts).
    """
    if volume.ndim != 4 or len(window.patch_size) != 2:
        raise ValueError(f"expected a (C, Z, Y, X) volume and a (Y, X) patch, got {tuple(volume.shape)} and {window.patch_size}")
    n_classes, pad_value = window.n_classes, window.pad_value
    index = list(range(volume.shape[1])) if slices is None else [int(z) for z in slices]
    out = torch.empty((n_classes, len(index), *volume.shape[2:]), dtype=torch.float32, device=volume.device)
    for z0 in range(0, len(index), slices_per_call):
        rows = list(range(z0, min(len(index), z0 + slices_per_call)))
        zs = [index[r] for r in rows]
        batch = stack_slices(volume, zs, in_slices)
        pads = pad_value
        if extra is not None:
            batch = torch.cat([batch, extra[:, zs].permute(1, 0, 2, 3).to(batch.dtype)], dim=1)
            if isinstance(pad_value, (int, float)):  # the extra channels are one-hot maps: pad them with 0
                pads = [float(pad_value)] * (batch.shape[1] - extra.shape[0]) + [0.0] * extra.shape[0]
        pred = sliding_window_predict_batch(predictor, batch, window.but(pad_value=pads))
        out[:, rows[0] : rows[-1] + 1] = pred.permute(1, 0, 2, 3)
    return out
