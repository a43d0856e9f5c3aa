"""Plain 2D U-Nets with fixed widths: ``unet2d_classic`` and ``mixpool_unet2d``.

Both: ``depth + 1`` levels of width ``base_features * 2**i`` (64-128-256-512-1024 by
default), two 3x3 convs (padding 1, so the output has the input's size) per level, 2x2
pooling between levels, dropout ``dropout`` (0.5) at the end of the contracting path (the
bottleneck), 2x2 transposed convs (stride 2) halving the width, concatenation with the
skip, two 3x3 convs, a 1x1 conv head. Inputs must be multiples of ``2**depth`` (16).

* ``unet2d_classic`` (Ronneberger et al. 2015): conv (bias) + ReLU, no norm, max pooling.
* ``mixpool_unet2d``: conv-BN-ReLU, and mixed pooling: per pooling layer a learned scalar
  ``alpha = sigmoid(alpha_logit)`` (starts at 0.5) mixes ``alpha * max + (1 - alpha) * avg``.

Options: ``base_features`` (64), ``depth`` (number of poolings, 4), ``dropout`` (0.5).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from autoliver.nets.estimate import Shape, Tally
from autoliver.nets.layers import ConvBNReLU, FixedNet, positive_int, register_family, relu_init
from autoliver.nets.registry import NetSpec


class MixedPool2d(nn.Module):
    """``alpha * maxpool + (1 - alpha) * avgpool`` with ``alpha = sigmoid(alpha_logit)``
    learned (one scalar per layer)."""

    def __init__(self, kernel: int = 2) -> None:
        super().__init__()
        self.kernel = kernel
        self.alpha_logit = nn.Parameter(torch.zeros(()))

    @property
    def alpha(self) -> torch.Tensor:
        return torch.sigmoid(self.alpha_logit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha
        return a * F.max_pool2d(x, self.kernel) + (1 - a) * F.avg_pool2d(x, self.kernel)

    @staticmethod
    def tally(t: Tally, shape: Shape, channels: int, kernel: int = 2) -> Shape:
        t.params += 1
        out = t.pool(shape, channels, kernel, indices=True)  # the max pool
        t.tensor(channels, out)  # the average pool
        return t.tensor(channels, out)  # the mix


def double_conv(cin: int, cout: int, norm: bool) -> nn.Sequential:
    return nn.Sequential(ConvBNReLU(2, cin, cout, bias=not norm, norm=norm), ConvBNReLU(2, cout, cout, bias=not norm, norm=norm))


def double_conv_tally(t: Tally, shape: Shape, cin: int, cout: int, norm: bool) -> Shape:
    shape = ConvBNReLU.tally(t, shape, cin, cout, bias=not norm, norm=norm)
    return ConvBNReLU.tally(t, shape, cout, cout, bias=not norm, norm=norm)


class _PlainUNet2d(FixedNet):
    defaults = {"base_features": 64, "depth": 4, "dropout": 0.5}
    norm: ClassVar[bool] = False
    mixed_pool: ClassVar[bool] = False

    @classmethod
    def check_options(cls, opts: dict[str, Any]) -> dict[str, Any]:
        opts = super().check_options(opts)
        positive_int(cls.name, "depth", opts["depth"])
        if not 0.0 <= float(opts["dropout"]) < 1.0:
            raise ValueError(f"network {cls.name!r}: option dropout must be in [0, 1), got {opts['dropout']!r}")
        return opts

    @classmethod
    def widths(cls, opts: dict[str, Any]) -> list[int]:
        return [opts["base_features"] * 2**i for i in range(opts["depth"] + 1)]

    def __init__(self, spec: NetSpec) -> None:
        super().__init__(spec)
        f = self.widths(self.opts)
        self.encoder = nn.ModuleList([double_conv(spec.in_channels if i == 0 else f[i - 1], f[i], self.norm) for i in range(len(f))])
        self.pools = nn.ModuleList([MixedPool2d(2) if self.mixed_pool else nn.MaxPool2d(2) for _ in range(len(f) - 1)])
        self.dropout = nn.Dropout(float(self.opts["dropout"]))
        levels = range(len(f) - 2, -1, -1)
        self.upsample = nn.ModuleList([nn.ConvTranspose2d(f[i + 1], f[i], 2, 2) for i in levels])
        self.decoder = nn.ModuleList([double_conv(2 * f[i], f[i], self.norm) for i in levels])
        self.head = nn.Conv2d(f[0], spec.n_classes, 1)
        self.apply(relu_init)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, stage in enumerate(self.encoder):
            x = stage(x if i == 0 else self.pools[i - 1](x))
            skips.append(x)
        x = self.dropout(skips.pop())
        for up, stage in zip(self.upsample, self.decoder):
            x = stage(torch.cat((up(x), skips.pop()), dim=1))
        return self.head(x)

    @classmethod
    def divisor_of(cls, opts: dict[str, Any]) -> tuple[int, ...]:
        return (2 ** opts["depth"],) * 2

    @classmethod
    def tally(cls, t: Tally, spec: NetSpec, opts: dict[str, Any], shape: Shape) -> None:
        f = cls.widths(opts)
        shapes = []
        for i in range(len(f)):
            if i > 0:
                shape = MixedPool2d.tally(t, shape, f[i - 1]) if cls.mixed_pool else t.pool(shape, f[i - 1], 2, indices=True)
            shape = double_conv_tally(t, shape, spec.in_channels if i == 0 else f[i - 1], f[i], cls.norm)
            shapes.append(shape)
        if float(opts["dropout"]) > 0:
            t.tensor(f[-1], shape)
            t.tensor(f[-1], shape, 1)  # the mask
        for i in range(len(f) - 2, -1, -1):
            t.transposed_conv(shape, f[i + 1], f[i], 2, saved=False)
            shape = t.resize(2 * f[i], shapes[i])  # the concatenation
            shape = double_conv_tally(t, shape, 2 * f[i], f[i], cls.norm)
        t.conv(shape, f[0], spec.n_classes, 1, bias=True, saved=False)


@register_family("unet2d_classic")
class ClassicUNet2d(_PlainUNet2d):
    norm = False
    mixed_pool = False


@register_family("mixpool_unet2d")
class MixPoolUNet2d(_PlainUNet2d):
    norm = True
    mixed_pool = True
