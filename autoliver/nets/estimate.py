"""Analytic parameter and activation counts, walked layer by layer without building modules.

A family's estimate walks the same layout its builder uses, calling one ``Tally`` method per
layer with the current feature-map shape (spatial axes only); each method adds the layer's
trainable parameters and the bytes of the tensor it produces when the backward pass keeps
that tensor, and returns the output shape. Counting rules (fp32, per sample):

* conv, norm, pooling, resampling, concatenation and residual-sum outputs are kept (the
  next conv or norm saves them); an in-place ReLU adds nothing; max pooling also keeps its
  int64 indices; a tensor that only feeds a concatenation is not kept (``saved=False``);
* the network input, and the loss's logits, probabilities and log-probabilities at the
  output (3 ``n_classes`` maps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from autoliver.nets.registry import NetEstimate

BYTES_FLOAT = 4
BYTES_INDEX = 8

Shape = tuple[int, ...]
IntOrTuple = int | Sequence[int]


def _per_axis(value: IntOrTuple, dims: int) -> tuple[int, ...]:
    return (int(value),) * dims if isinstance(value, int) else tuple(int(v) for v in value)


def conv_output_size(n: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    """Output length of a conv or pool along one axis (torch's floor formula)."""
    return (n + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


class Tally:
    """Running totals: ``params`` (trainable parameters) and ``saved_bytes`` (activations
    kept for the backward pass, one sample)."""

    def __init__(self, dims: int) -> None:
        self.dims = dims
        self.params = 0
        self.saved_bytes = 0

    def tensor(self, channels: int, shape: Shape, bytes_per_element: int = BYTES_FLOAT) -> Shape:
        """Count a kept tensor of ``channels`` x ``shape``."""
        self.saved_bytes += channels * math.prod(shape) * bytes_per_element
        return tuple(shape)

    def conv(
        self, shape: Shape, cin: int, cout: int, kernel: IntOrTuple = 3, stride: IntOrTuple = 1, *,
        dilation: int = 1, padding: IntOrTuple | None = None, bias: bool = False, saved: bool = True,
    ) -> Shape:
        """A conv; padding defaults to ``dilation * (kernel // 2)`` (same size at stride 1)."""
        k, s = _per_axis(kernel, self.dims), _per_axis(stride, self.dims)
        p = tuple(dilation * (x // 2) for x in k) if padding is None else _per_axis(padding, self.dims)
        self.params += cin * cout * math.prod(k) + (cout if bias else 0)
        out = tuple(conv_output_size(n, kk, ss, pp, dilation) for n, kk, ss, pp in zip(shape, k, s, p))
        if saved:
            self.tensor(cout, out)
        return out

    def transposed_conv(self, shape: Shape, cin: int, cout: int, kernel: IntOrTuple, *, bias: bool = True, saved: bool = True) -> Shape:
        """A transposed conv with stride = kernel and no padding (exact upsampling)."""
        k = _per_axis(kernel, self.dims)
        self.params += cin * cout * math.prod(k) + (cout if bias else 0)
        out = tuple(n * kk for n, kk in zip(shape, k))
        if saved:
            self.tensor(cout, out)
        return out

    def norm(self, shape: Shape, channels: int, *, saved: bool = True) -> Shape:
        """An affine batch or instance norm (scale and shift per channel)."""
        self.params += 2 * channels
        return self.tensor(channels, shape) if saved else tuple(shape)

    def pool(self, shape: Shape, channels: int, kernel: IntOrTuple, stride: IntOrTuple | None = None, padding: int = 0, *, indices: bool = False) -> Shape:
        k = _per_axis(kernel, self.dims)
        s = k if stride is None else _per_axis(stride, self.dims)
        out = tuple(conv_output_size(n, kk, ss, padding) for n, kk, ss in zip(shape, k, s))
        self.tensor(channels, out)
        if indices:
            self.tensor(channels, out, BYTES_INDEX)
        return out

    def resize(self, channels: int, shape: Shape, *, saved: bool = True) -> Shape:
        """Interpolation (or unpooling) to ``shape``."""
        return self.tensor(channels, shape) if saved else tuple(shape)

    def result(self, input_shape: Shape, in_channels: int, n_classes: int) -> NetEstimate:
        """The estimate, adding the input and the loss's tensors at the output resolution."""
        self.tensor(in_channels, input_shape)
        self.tensor(3 * n_classes, input_shape)
        return NetEstimate(parameters=int(self.params), activation_bytes_per_sample=int(self.saved_bytes))
